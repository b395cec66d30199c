"""The browser chat: talk with the grounded LM about your images; it answers with text and with images
retrieved from a collection where it emits `[RET]`.

    python app.py                          # the offline demo model and gallery, http://127.0.0.1:7860
    python app.py --checkpoint fromage --index photos.index --host 0.0.0.0

This file is the only thing that touches the UI: it turns chat input into `Turn`s, runs
`model.generate.stream_reply` in Gradio's worker threads and renders its events as they come.
Sessions share the model and the index; everything else (history, uploads, retrieved ids, the
Stop flag) lives in a per-browser-tab `Session`.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import html
import io
import json
import logging
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import huggingface_hub.constants
from PIL import Image
from tqdm.auto import tqdm

from model.config import CONFIG_NAME
from model.files import write_atomically
from model.generate import Done, GenerationSettings, Looked, Notice, Retrieved, Text, Thought, stream_reply
from model.grounded import GroundedLM
from model.images import MAX_BYTES, ImageError, file_sha256, image_key, load_image
from model.lm import QUANTIZE_CHOICES, cache_dir, default_device
from model.monologue import think
from model.perception import heat_map
from model.prompt import Turn, looked_at
from model.serving import Busy, DecodeEngine, Waiting
from model.world import shapes
from retrieval_index.build import build_index, read_captions
from retrieval_index.index import SHA256, Hit, ImageIndex, ImageInfo, IndexFormatError

ASSETS = Path(__file__).resolve().parent / "assets"
HUB_PRESETS = ("fromage", "fromage-vis4")
LOCAL_LM = "smollm2-135m-instruct"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Grounded multimodal chat in the browser (FROMAGe-style). Starts offline on the demo "
                    "model; the demo gallery is rendered and indexed on first start, then reused.")
    parser.add_argument("--checkpoint", "--preset", default="demo", metavar="NAME_OR_FOLDER",
                        help="a preset (demo, demo-esper, fromage, fromage-vis4) or a checkpoint folder "
                             "(grounded_config.json + mappings.safetensors). Default: demo. demo-esper was "
                             "aligned without captions (ESPER): it describes and chats but does not retrieve. "
                             "fromage* download the official weights on first use (needs the network).")
    parser.add_argument("--index", type=Path, metavar="FOLDER",
                        help="image index to retrieve from (made by `python -m retrieval_index.build`); "
                             "default: the demo gallery, built in the cache on first start")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                        help="how to load the frozen LM (bitsandbytes). Default: as the checkpoint was trained "
                             "(4bit for the demo); another choice shifts the hidden states its mappings expect")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all). "
                                                             "Default: 127.0.0.1")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on. Default: 7860")
    parser.add_argument("--share", action="store_true",
                        help="also open a temporary public link through Gradio's share servers (off by default)")
    parser.add_argument("--max-batch", type=int, default=8, metavar="N",
                        help="replies decoded together, one batched forward per step for all of them; up to 3N "
                             "more wait with their place shown. 0: each reply decodes on its own (the old way, "
                             "--max-concurrency at a time). Default: 8")
    parser.add_argument("--max-concurrency", type=int, metavar="N",
                        help="with --max-batch 0: replies generated at the same time; more wait in the queue. "
                             "Default: 2 on the CPU, 4 on a GPU")
    args = parser.parse_args(argv)
    if args.max_concurrency is not None and args.max_concurrency < 1:
        parser.error("--max-concurrency must be at least 1")
    if args.max_batch < 0:
        parser.error("--max-batch must be 0 or more")
    return args


def asks_for_hub(checkpoint: str) -> bool:
    """Whether the checkpoint names a model that is downloaded (so the hub must stay reachable)."""
    if checkpoint in HUB_PRESETS:
        return True
    config_path = Path(checkpoint) / CONFIG_NAME
    if not config_path.is_file():  # the bundled demo, or a bad path reported when loading
        return False
    config = json.loads(config_path.read_text())
    lm_is_local = config.get("lm") == LOCAL_LM or Path(config.get("lm", "")).is_dir()
    return not (lm_is_local and str(config.get("visual", "")).startswith("local-dir:"))


def keep_to_this_machine(args: argparse.Namespace) -> None:
    """No analytics, no telemetry, and no hub unless the checkpoint is downloaded from it, for this process
    and the ones it starts; a variable the user set wins. huggingface_hub reads its variables once, when
    gradio imports it, so the ones set here also go into its constants."""
    defaults = {"HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    if not asks_for_hub(args.checkpoint):
        defaults["HF_HUB_OFFLINE"] = "1"
    for name, value in defaults.items():
        if name not in os.environ:
            os.environ[name] = value
            if hasattr(huggingface_hub.constants, name):
                setattr(huggingface_hub.constants, name, True)


log = logging.getLogger("app")

DEMO_GALLERY_SIZE = 1000  # the shapes world's test split: never seen in training
GALLERY_PAGE = 48
DISPLAY_SIDE = 512  # chat thumbnails; the model always gets the full decoded image
UPLOAD_SOURCE = "upload"
SHARED_UPLOADS = "uploads"  # beside the index: uploads their owners added to the shared collection
NO_RETRIEVAL = " · this model cannot search by text: it was aligned without captions, its retrieval never trained"
EXAMPLE_PROMPTS = (
    ("What is in this picture?", "red-hexagon.png"),
    ("Describe the image.", "three-shapes.png"),
    ("Find an image of a large blue circle in the centre.", None),
    ("Show me a big green triangle.", None),
)


# ---- the collection ----------------------------------------------------------------------------

def demo_gallery(model: GroundedLM, folder: Path | None = None, size: int = DEMO_GALLERY_SIZE) -> Path:
    """The demo gallery's index folder: the test split rendered once, and indexed on the first start of each
    image mapping, then reused. Each mapping keeps its own index, so switching checkpoints (`demo`,
    `demo-esper`) neither rebuilds the other's nor drops the uploads shared into it; a damaged index is rebuilt
    around them.
    """
    folder = folder or cache_dir() / "demo-gallery"
    images, captions_path = folder / "images", folder / "captions.tsv"
    index_dir = folder / f"index-{model.fingerprint}"
    legacy = folder / "index"  # one index for every mapping, as before: adopted by the mapping that made it
    if legacy.is_dir() and not index_dir.exists():
        try:
            with ImageIndex.load(legacy, None) as index:
                adopt = index.fingerprint == model.fingerprint
        except (IndexFormatError, FileNotFoundError):
            adopt = False
        if adopt:
            legacy.rename(index_dir)
    if not captions_path.is_file():  # written last: its presence means every image is there
        images.mkdir(parents=True, exist_ok=True)
        rows = ["path\tcaption"]
        for i in tqdm(range(size), desc="rendering the demo gallery", unit="img"):
            sample = shapes.sample("test", i)
            name = f"test-{i:04d}.png"
            sample.image.save(images / name)
            rows.append(f"{name}\t{sample.caption}")
        write_atomically(captions_path, lambda tmp: tmp.write_text("\n".join(rows) + "\n", encoding="utf-8"))
    try:
        with ImageIndex.load(index_dir, model.fingerprint) as index:
            if len(index) >= size:
                return index_dir
    except IndexFormatError as e:
        print(f"The demo gallery's index is damaged ({str(e).split('; ')[0]}); rebuilding it, with the uploads "
              "shared into it.", file=sys.stderr)
        for part in index_dir.iterdir():
            if part.name != SHARED_UPLOADS:
                shutil.rmtree(part) if part.is_dir() else part.unlink()
    except FileNotFoundError:
        pass
    print(f"Indexing the demo gallery into {index_dir} (once; reused on later starts).", file=sys.stderr)
    report = build_index(model, images, index_dir, captions=read_captions(captions_path), source="shapes-test")
    print(report.summary(), file=sys.stderr)
    index_shared_uploads(model, index_dir)
    return index_dir


def index_shared_uploads(model: GroundedLM, index_dir: Path) -> None:
    """Index the uploads shared into a rebuilt index again, each under its upload's sha256 (its file's name;
    uploads shared before names were whole, the file's own hash)."""
    uploads, added = sorted((index_dir / SHARED_UPLOADS).glob("*.png")), 0
    if not uploads:
        return
    with ImageIndex.load(index_dir, model.fingerprint) as index:
        for path in uploads:
            try:
                data = path.read_bytes()
                image = load_image(data)
            except (ImageError, OSError) as e:
                print(f"A shared upload was skipped: {path.name}: {e}", file=sys.stderr)
                continue
            sha = path.stem if SHA256.fullmatch(path.stem) else file_sha256(data)
            added += add_shared(index, model, image, path, sha) is not None
    if added:
        print(f"Shared uploads indexed again: {added}.", file=sys.stderr)


def add_shared(index: ImageIndex, model: GroundedLM, image: Image.Image, path: Path, sha: str) -> int | None:
    """Index an upload a user shared, saved at `path` beside the index; its id (None: already there)."""
    vector = model.embed_images([image]).float().cpu().numpy()  # (1, emb_dim)
    ids = index.add(vector, [ImageInfo(path=os.path.relpath(path, index.folder), sha256=sha, width=image.width,
                                       height=image.height, caption="Shared by a user", source=UPLOAD_SOURCE)])
    index.save()
    return ids[0]


def collection_folders(index: ImageIndex) -> list[Path]:
    """The folders the collection's images live in (and where shared uploads go): the only folders besides
    assets/ and Gradio's upload folder that are served. The index's own files are not."""
    folders = {index.folder / SHARED_UPLOADS}
    for record in index.records(0, len(index)):
        folders.add(Path(record.path).parent)
    return sorted(f for f in folders if not any(p in folders for p in f.parents))


# ---- one browser tab ---------------------------------------------------------------------------

@dataclass
class Shown:
    """An image in the reply as the chat shows it: a thumbnail, then its label (a retrieved image's caption and
    score; where the model looked, `looked`)."""
    path: str
    label: str
    kind: str = "ret"


@dataclass
class Exchange:
    """A user message and the reply to it: as the model sees them (`user`, `reply`) and as the chat shows them."""
    text: str
    files: list[str]
    user: Turn | None  # None when nothing in the message could be used
    user_view: list[dict]  # the user's bubble and notes about the uploads
    known_ids: list[int] = field(default_factory=list)  # collection ids of the uploads: never retrieved back
    reply: Turn | None = None
    reply_view: list[str | Shown] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    retrieved: list[int] = field(default_factory=list)
    stopped: bool = False
    ahead: int | None = None  # waiting for the batched decoder: how many replies start before this one
    thoughts: list[list[str]] = field(default_factory=list)  # the inner monologue's lines: [role, text]
    thinking: bool = False  # the monologue is still being written

    def messages(self) -> list[dict]:
        monologue = [] if not self.thoughts else [{
            "role": "assistant", "content": "\n\n".join(f"**{role}:** {html.escape(text)}" for role, text in self.thoughts),
            "metadata": {"title": "Inner monologue", "status": "pending" if self.thinking else "done"}}]
        content: list = []
        if self.ahead is not None:
            place = "yours is next" if self.ahead == 0 else f"{self.ahead} ahead of yours"
            content.append(f'<span class="waiting">Waiting for the model: {place}.</span>')
        for piece in self.reply_view:
            if isinstance(piece, Shown):
                content += [{"path": piece.path, "alt_text": piece.label},
                            f'<span class="{piece.kind}-caption">{html.escape(piece.label)}</span>']
            else:
                content.append(piece)
        if self.stopped:
            content.append('<span class="stopped">Stopped</span>')
        reply = [{"role": "assistant", "content": content}] if content else []
        return self.user_view + [notice_message(n) for n in self.notices] + monologue + reply


class Session:
    """One browser tab's conversation. Gradio keeps one per tab (`gr.State`) and passes it to every
    handler; `lock` orders a reply's updates against Stop, Undo and Clear arriving meanwhile."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []
        self.replying: Exchange | None = None
        self.cancel = threading.Event()
        self.lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> Session:  # gr.State copies its initial value for each tab
        new = Session()
        new.exchanges = copy.deepcopy(self.exchanges, memo)
        return new

    def turns(self, until: Exchange | None = None) -> list[Turn]:
        """The conversation as the model sees it, up to and including `until` (default: all)."""
        turns = []
        for exchange in self.exchanges:
            turns += [t for t in (exchange.user, exchange.reply) if t is not None]
            if exchange is until:
                break
        return turns

    def messages(self) -> list[dict]:
        return [m for e in self.exchanges for m in e.messages()]

    def shown_ids(self) -> set[int]:
        return {i for e in self.exchanges for i in (*e.known_ids, *e.retrieved)}


def notice_message(text: str) -> dict:
    return {"role": "assistant", "content": text, "metadata": {"title": "Note"}}


def conversion_note(data: bytes) -> str | None:
    """How a decodable upload differs from what the model sees, for the formats `load_image` converts."""
    with Image.open(io.BytesIO(data)) as image:
        if getattr(image, "n_frames", 1) > 1:
            return f"is animated ({image.n_frames} frames): the model sees its first frame."
        if image.mode == "CMYK":
            return "is a CMYK image: converted to RGB."
        if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
            return "has 16-bit pixels: scaled to 8 bits."
        if image.has_transparency_data:
            return "has transparency: the model sees it on a white background."
    return None


# ---- the app -----------------------------------------------------------------------------------

class ChatApp:
    """Event handlers over one shared model and index; `build` wires them into the Gradio UI."""

    def __init__(self, model: GroundedLM, index: ImageIndex, title: str = "demo", engine: DecodeEngine | None = None):
        """With `engine`, every reply decodes in its shared batch; without, each in its own handler thread."""
        self.model, self.index, self.title, self.engine = model, index, title, engine
        self.display_dir = Path(gr.utils.get_upload_folder()) / "grounded-chat"  # served: Gradio's upload folder
        self.display_dir.mkdir(parents=True, exist_ok=True)
        self.allowed_paths = [str(ASSETS), *map(str, collection_folders(index))]

    # ---- chat ------------------------------------------------------------------------------------
    def chat(self, message: dict | None, session: Session, temperature: float = 0.0, top_p: float = 1.0,
             max_new_tokens: int = 128, ret_scale: float = 1.0, max_images: int = 2,
             share_uploads: bool = False, interactive: bool = True, monologue: bool = False
             ) -> Iterator[tuple[list[dict], dict | None]]:
        """Add the user's message (text and any number of images) and stream the reply. `interactive`: a model
        with a request module looks at the images asked about first, and the reply shows where (LMEye).
        `monologue`: a model with a Reasoner thinks before answering about an image, and the chat shows the
        monologue (IMMO); without an image in the conversation it has no effect."""
        text = ((message or {}).get("text") or "").strip()
        files = list((message or {}).get("files") or [])
        if not text and not files:
            yield session.messages(), gr.skip()
            return
        exchange = self._exchange(text, files, share_uploads)
        with session.lock:
            session.exchanges.append(exchange)
        yield session.messages(), None  # the message shows at once, the input box clears
        if exchange.user is not None:
            settings = self._settings(temperature, top_p, max_new_tokens, ret_scale, max_images, interactive)
            for messages in self._reply(session, exchange, settings, monologue):
                yield messages, gr.skip()

    def retry(self, session: Session, temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 128,
              ret_scale: float = 1.0, max_images: int = 2, interactive: bool = True, monologue: bool = False
              ) -> Iterator[list[dict]]:
        """Answer the last message again (with the current settings)."""
        with session.lock:
            exchange = session.exchanges[-1] if session.exchanges else None
            if exchange is not None and exchange.user is not None:
                exchange.reply, exchange.reply_view, exchange.notices = None, [], []
                exchange.retrieved, exchange.stopped, exchange.thoughts = [], False, []
        yield session.messages()
        if exchange is not None and exchange.user is not None:
            yield from self._reply(session, exchange, self._settings(temperature, top_p, max_new_tokens, ret_scale,
                                                                     max_images, interactive), monologue)

    def undo(self, session: Session) -> tuple[list[dict], dict | None]:
        """Take back the last message and its reply; its text and images go back into the input box."""
        with session.lock:
            session.cancel.set()
            if not session.exchanges:
                return session.messages(), gr.skip()
            last = session.exchanges.pop()
            return session.messages(), {"text": last.text, "files": last.files}

    def clear(self, session: Session) -> list[dict]:
        with session.lock:
            session.cancel.set()
            session.exchanges = []
        return []

    def stop(self, session: Session) -> list[dict]:
        """Stop the reply being generated; what it said so far stays."""
        with session.lock:
            session.cancel.set()
            if session.replying is not None:
                session.replying.stopped = True
            return session.messages()

    def _settings(self, temperature: float, top_p: float, max_new_tokens: int, ret_scale: float,
                  max_images: int, interactive: bool) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                  top_p=float(top_p), ret_scale_factor=float(ret_scale), max_images=int(max_images),
                                  look=bool(interactive))

    def _exchange(self, text: str, files: list[str], share_uploads: bool) -> Exchange:
        """Decode the uploads once; a bad one becomes a notice in the chat and the rest goes on."""
        images, views, notices, known = [], [], [], []
        for path in files:
            name = Path(path).name
            try:
                data = Path(path).read_bytes()
                image = load_image(data)
            except ImageError as e:
                notices.append(f"**{name}** was not used: {e}.")
                continue
            except OSError as e:
                notices.append(f"**{name}** was not used: it could not be read ({e.strerror}).")
                continue
            note = conversion_note(data)
            if note:
                notices.append(f"**{name}** {note}")
            images.append(image)
            views.append({"path": self._display_copy(image, image_key(image)), "alt_text": name})
            sha = file_sha256(data)
            id_ = self.index.id_for_sha256(sha)
            if id_ is None and share_uploads:
                try:
                    id_ = self._share(image, sha)
                except (OSError, ValueError) as e:  # a full disk, a broken index: the chat goes on
                    notices.append(f"**{name}** could not be added to the shared collection: {e}")
            if id_ is not None:
                known.append(id_)
        user = Turn("user", [*images, text] if text else images) if images or text else None
        bubble = views + ([text] if text else [])
        if not bubble:  # nothing usable: say which files were sent
            bubble = ["Attached: " + ", ".join(Path(f).name for f in files)]
        user_view = [{"role": "user", "content": bubble}] + [notice_message(n) for n in notices]
        return Exchange(text, files, user, user_view, known)

    def _reply(self, session: Session, exchange: Exchange, settings: GenerationSettings,
               monologue: bool = False) -> Iterator[list[dict]]:
        """Stream the reply to `exchange` into it, event by event; yields the chat after each change. With
        `monologue`, a model with a Reasoner and a conversation with an image think first (`model.monologue`)."""
        with session.lock:
            session.cancel = cancel = threading.Event()
            session.replying = exchange
            history = session.turns(until=exchange)
            settings.exclude = session.shown_ids()
            exchange.reply = Turn("assistant", [])
        search = lambda query, exclude: self.index.search(query, k=settings.images_per_ret, exclude=exclude)  # noqa: E731
        try:
            if monologue and self.model.reasoner is not None and looked_at(history) and history[-1].text.strip():
                events = think(self.model, history, settings, search, cancel, engine=self.engine)
            elif self.engine is not None:
                events = self.engine.submit(history, settings, search, cancel)
            else:
                events = stream_reply(self.model, history, settings, search, cancel)
            for event in events:
                with session.lock:
                    if cancel.is_set():  # Stop, Undo or Clear: nothing more goes into the session
                        break
                    self._apply(exchange, event)
                yield session.messages()
        except GeneratorExit:  # Gradio dropped the job (Stop, or the tab closed): the reply ends here
            with session.lock:
                exchange.stopped = True
            raise
        except Busy as e:  # the batched decoder had no room in time
            with session.lock:
                exchange.notices.append(str(e))
        except Exception as e:  # the model's own error, shown as it is: never a generic failure
            log.exception("generation failed")
            with session.lock:
                exchange.notices.append(f"The model failed: {type(e).__name__}: {e}")
        finally:
            with session.lock:
                exchange.ahead, exchange.thinking = None, False
                if session.replying is exchange:
                    session.replying = None
        yield session.messages()

    def _apply(self, exchange: Exchange, event: Waiting | Looked | Thought | Text | Retrieved | Notice | Done) -> None:
        """One generation event into the reply: the model's turn and the chat's view grow together (the
        monologue only in the view: the next turns see the answer, not the thinking)."""
        parts, view = exchange.reply.parts, exchange.reply_view
        exchange.ahead = event.ahead if isinstance(event, Waiting) else None
        exchange.thinking = isinstance(event, Thought)
        if isinstance(event, Thought):
            if event.line < len(exchange.thoughts):
                exchange.thoughts[event.line][1] += event.delta
            else:
                exchange.thoughts.append([event.role, event.delta])
        elif isinstance(event, Looked):  # shown, not said: the model's turn does not hold it
            picture = heat_map(event.image, event.attention)
            key = hashlib.sha256(image_key(event.image).encode() + event.attention.cpu().numpy().tobytes()).hexdigest()
            view.append(Shown(self._display_copy(picture, f"looked-{key}"),
                              "Looked here first (brighter: where the question sent the model's attention)", "looked"))
        elif isinstance(event, Text):
            for pieces in (parts, view):
                if pieces and isinstance(pieces[-1], str):
                    pieces[-1] += event.delta
                else:
                    pieces.append(event.delta)
        elif isinstance(event, Retrieved):
            for hit in event.hits:
                try:
                    image = load_image(hit.path)
                except ImageError as e:
                    exchange.notices.append(f"A retrieved image could not be shown: {e}.")
                    continue
                parts.append(image)  # the next turns see the image where [RET] fired, as in FROMAGe
                exchange.retrieved.append(hit.id)
                view.append(Shown(self._display_copy(image, hit.sha256), hit_label(hit)))
        elif isinstance(event, Notice):
            exchange.notices.append(event.message)
        elif isinstance(event, Done) and not view:
            view.append("_(no reply)_")

    def _display_copy(self, image: Image.Image, key: str) -> str:
        """A small PNG of `image` in Gradio's upload folder: served as is, never re-hashed on each stream step."""
        path = self.display_dir / f"{key[:32]}.png"
        if not path.is_file():
            thumb = image.copy()
            thumb.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
            write_atomically(path, lambda tmp: thumb.save(tmp, format="PNG"))
        return str(path)

    def _share(self, image: Image.Image, sha: str) -> int | None:
        """Add an upload to the shared collection (the user opted in): stored beside the index, named by the
        upload's sha256 so that an index rebuilt around it keeps it as the same upload."""
        folder = self.index.folder / SHARED_UPLOADS
        folder.mkdir(exist_ok=True)
        path = folder / f"{sha}.png"
        image.save(path, format="PNG")
        return add_shared(self.index, self.model, image, path, sha)

    # ---- gallery ---------------------------------------------------------------------------------
    def browse(self, page: int = 0) -> tuple[list[tuple[str, str]], str, int]:
        """One page of the collection, in the order images were added."""
        pages = max(1, -(-len(self.index) // GALLERY_PAGE))
        page = min(max(int(page), 0), pages - 1)
        items = [(r.path, r.caption or "") for r in self.index.records(page * GALLERY_PAGE, GALLERY_PAGE)]
        first = page * GALLERY_PAGE + 1
        label = (f"Images {first}–{first + len(items) - 1} of {len(self.index)} · page {page + 1} of {pages}"
                 if items else "The collection is empty.")
        return items, label, page

    def search(self, query: str) -> tuple[list[tuple[str, str]], str]:
        """The collection ranked by the model's own retrieval vector for the text."""
        query = (query or "").strip()
        if not query or not self.model.config.retrieves:
            items, label, _ = self.browse(0)
            return items, label + NO_RETRIEVAL if query else label
        try:
            vector = self.model.text_query(query)
        except ValueError:  # only punctuation: nothing to ask for
            return [], f"“{query}” names nothing to search for."
        hits = self.index.search(vector, k=GALLERY_PAGE)
        return ([(h.path, hit_label(h)) for h in hits],
                f"Best {len(hits)} matches for “{query}”")

    # ---- UI --------------------------------------------------------------------------------------
    def example_prompts(self) -> list[dict]:
        """The chat's starting points; a model that does not retrieve is not offered the requests for a picture."""
        return [{"text": text, **({"files": [str(ASSETS / "examples" / image)]} if image else {}),
                 "display_text": text} for text, image in EXAMPLE_PROMPTS if image or self.model.config.retrieves]

    def build(self, max_concurrency: int | None = None) -> gr.Blocks:
        """`max_concurrency`: replies handled at once (default: with the engine, its rows and its waiting line,
        so that a waiting user sees their place; without, 2)."""
        if max_concurrency is None:
            max_concurrency = self.engine.max_batch + self.engine.max_waiting if self.engine is not None else 2
        examples = self.example_prompts()
        with gr.Blocks(title="Grounded Chat") as demo:
            session = gr.State(Session())  # deep-copied into a fresh Session for each tab
            retrieves = self.model.config.retrieves
            gr.HTML(header_html(self.title, len(self.index), retrieves), elem_id="header")
            with gr.Tabs():
                with gr.Tab("Chat", id="chat"):
                    with gr.Row(equal_height=False):
                        with gr.Column(scale=4, min_width=420):
                            chatbot = gr.Chatbot(
                                elem_id="chatbot", height="66vh", min_height=420, show_label=False, layout="bubble",
                                buttons=["copy", "copy_all"], examples=examples,
                                placeholder="**Ask about an image, or ask for one.**<br>Attach images with the clip "
                                            "button, or start from an example.")
                            textbox = gr.MultimodalTextbox(
                                elem_id="message", file_count="multiple", file_types=["image"], show_label=False,
                                placeholder="Message… (attach images with the clip, Enter to send)",
                                max_plain_text_length=1_000_000, autofocus=True)
                            with gr.Row(elem_id="actions"):
                                stop_btn = gr.Button("Stop", size="sm", elem_id="stop")
                                retry_btn = gr.Button("Retry", size="sm", elem_id="retry")
                                undo_btn = gr.Button("Undo", size="sm", elem_id="undo")
                                clear_btn = gr.Button("Clear", size="sm", elem_id="clear")
                        with gr.Column(scale=1, min_width=260, elem_id="side"):
                            with gr.Accordion("Settings", open=True, elem_id="settings"):
                                temperature = gr.Slider(0, 2, value=0.0, step=0.05, label="Temperature",
                                                        info="0 decodes greedily", elem_id="temperature")
                                top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top-p", elem_id="top-p")
                                max_new_tokens = gr.Slider(1, 512, value=128, step=1, label="Max new tokens",
                                                           elem_id="max-new-tokens")
                                ret_scale = gr.Slider(0, 3, value=1.0, step=0.1, label="[RET] scale factor",
                                                      info="how readily images are retrieved; 0 never" if retrieves
                                                      else "This model does not retrieve", elem_id="ret-scale",
                                                      interactive=retrieves)
                                max_images = gr.Slider(0, 3, value=2, step=1, label="Max images per reply",
                                                       elem_id="max-images", interactive=retrieves)
                                looks = self.model.perception is not None
                                interactive = gr.Checkbox(
                                    looks, label="Look before answering", elem_id="interactive", interactive=looks,
                                    info="The model asks the image for what the question needs and shows where it "
                                         "looked (LMEye)" if looks else "This model has no request module")
                                thinks = self.model.reasoner is not None
                                monologue = gr.Checkbox(
                                    False, label="Think before answering", elem_id="monologue", interactive=thinks,
                                    info="About an image: a text-only Reasoner asks the Observer questions first, "
                                         "and the chat shows the monologue (IMMO)" if thinks
                                    else "This model has no Reasoner")
                            share_uploads = gr.Checkbox(
                                False, label="Add my uploads to the shared collection", elem_id="share-uploads",
                                info="Off: your images stay in this session. On: everyone can be shown them.")
                with gr.Tab("Gallery", id="gallery"):
                    with gr.Row(equal_height=True):
                        query = gr.Textbox(show_label=False, placeholder="Search the collection by text, "
                                           "e.g. a large red circle on the left" if retrieves else
                                           "This model cannot search by text: browse the collection below",
                                           scale=5, elem_id="gallery-query", interactive=retrieves)
                        search_btn = gr.Button("Search", variant="primary", scale=1, elem_id="gallery-search")
                    status = gr.Markdown(elem_id="gallery-status")
                    gallery = gr.Gallery(show_label=False, columns=8, height=620, object_fit="contain",
                                         elem_id="gallery-grid", buttons=["fullscreen"])
                    with gr.Row(elem_id="pager"):
                        prev_btn = gr.Button("← Previous", size="sm")
                        next_btn = gr.Button("Next →", size="sm")
                    page = gr.State(0)

            settings = [temperature, top_p, max_new_tokens, ret_scale, max_images]
            switches = [interactive, monologue]
            generate = {"concurrency_id": "generate", "concurrency_limit": max_concurrency}
            chat_event = textbox.submit(self.chat, [textbox, session, *settings, share_uploads, *switches],
                                        [chatbot, textbox], api_name="chat", **generate)
            retry_event = gr.on([retry_btn.click, chatbot.retry], self.retry, [session, *settings, *switches],
                                chatbot, api_name="retry", **generate)
            chatbot.example_select(example_message, None, textbox, api_name="example")  # fills the input box
            gr.on([stop_btn.click], self.stop, session, chatbot, api_name="stop", concurrency_limit=None,
                  cancels=[chat_event, retry_event])
            gr.on([undo_btn.click, chatbot.undo], self.undo, session, [chatbot, textbox], api_name="undo",
                  concurrency_limit=None, cancels=[chat_event, retry_event])
            gr.on([clear_btn.click, chatbot.clear], self.clear, session, chatbot, api_name="clear",
                  concurrency_limit=None, cancels=[chat_event, retry_event])

            gr.on([query.submit, search_btn.click], self.search, query, [gallery, status], api_name="search")
            demo.load(self.browse, page, [gallery, status, page], api_name="browse")
            prev_btn.click(lambda p: self.browse(p - 1), page, [gallery, status, page], api_name="previous_page")
            next_btn.click(lambda p: self.browse(p + 1), page, [gallery, status, page], api_name="next_page")
        demo.queue(default_concurrency_limit=max_concurrency)
        return demo

    def launch(self, demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
               prevent_thread_lock: bool = False) -> None:
        """Serve only assets/, the collection's folders and Gradio's upload folder (where chat images go)."""
        demo.launch(server_name=host, server_port=port, share=share, allowed_paths=self.allowed_paths,
                    max_file_size=MAX_BYTES, show_error=True, prevent_thread_lock=prevent_thread_lock,
                    theme=gr.themes.Default(primary_hue="indigo", neutral_hue="slate"),
                    css_paths=[ASSETS / "app.css"], footer_links=["api"])


def example_message(selected: gr.SelectData) -> dict:
    """The example's prompt and images, for the input box. Images go back as server paths: their URLs
    would make Gradio fetch them over HTTP from itself, which it refuses."""
    files = [f["path"] if isinstance(f, dict) else f for f in selected.value.get("files") or []]
    return {"text": selected.value.get("text", ""), "files": files}


def hit_label(hit: Hit) -> str:
    return f"{hit.caption or 'No caption'} · score {hit.score:.2f}"


def header_html(title: str, n_images: int, retrieves: bool = True) -> str:
    tagline = ("Talk about your images; the model answers with text and with pictures it retrieves "
               "from the collection, right where it says <code>[RET]</code>." if retrieves else
               "Talk about your images; the model describes them and chats. This checkpoint was aligned to "
               "images without captions (ESPER) and does not retrieve pictures.")
    badge = f"{n_images:,} images indexed" if retrieves else "no retrieval"
    return (
        f'<div class="brand"><div class="logo">◆</div><div><h1>Grounded Chat</h1><p>{tagline}</p></div></div>'
        f'<div class="badges"><span class="badge">model: {title}</span><span class="badge">{badge}</span></div>')


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    keep_to_this_machine(args)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    device = default_device()
    try:
        model = GroundedLM.from_pretrained(args.checkpoint, quantize=args.quantize, device=device)
        index_dir = args.index or demo_gallery(model)
        index = ImageIndex.load(index_dir, model.fingerprint)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # includes the index's own mismatch message
        sys.exit(f"error: {e}")
    engine = DecodeEngine(model, args.max_batch, max_waiting=3 * args.max_batch) if args.max_batch else None
    app = ChatApp(model, index, title=Path(str(args.checkpoint)).name, engine=engine)
    demo = app.build(None if engine else args.max_concurrency or (4 if device.type == "cuda" else 2))
    app.launch(demo, args.host, args.port, args.share)


if __name__ == "__main__":
    main()
