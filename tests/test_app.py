"""The chat app's handlers, called as Gradio calls them, on a tiny model and a tiny shapes gallery
(`conftest.make_tiny_app`, whose model retrieves on demand)."""
from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import DecodeGate, make_tiny_app, png_bytes, teach_reasoner, tiny_config

REPO = Path(__file__).resolve().parents[1]
RETRIEVE = dict(ret_scale=3.0, max_images=1)  # the tiny model retrieves first, then goes on writing


def upload(folder: Path, name: str, data: bytes) -> str:
    """A file as Gradio hands an upload to a handler: a path whose name is the user's file name."""
    path = folder / name
    path.write_bytes(data)
    return str(path)


def run(generator) -> list:
    return list(generator)


def final_chat(outputs: list) -> list[dict]:
    last = outputs[-1]
    return last[0] if isinstance(last, tuple) else last


def texts(message: dict) -> str:
    content = message["content"]
    content = content if isinstance(content, list) else [content]
    return " ".join(c for c in content if isinstance(c, str))


def images_in(message: dict) -> list[str]:
    content = message["content"]
    content = content if isinstance(content, list) else [content]
    return [c["path"] for c in content if isinstance(c, dict)]


def notes(chat: list[dict]) -> str:
    return " ".join(m["content"] for m in chat if m.get("metadata"))


@pytest.fixture(scope="module")
def tiny_app(tiny_lm_dir, tiny_clip_dir, tmp_path_factory):
    return make_tiny_app(tiny_lm_dir, tiny_clip_dir, tmp_path_factory.mktemp("gallery"))


@pytest.fixture
def session():
    import app
    return app.Session()


# ---- start-up ------------------------------------------------------------------------------------

def test_help_documents_every_option_without_loading_a_model():
    proc = subprocess.run([sys.executable, "app.py", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    for option in ("--checkpoint", "--preset", "--index", "--quantize", "--host", "--port", "--share",
                   "--max-batch", "--max-concurrency"):
        assert option in proc.stdout
    assert "off by default" in proc.stdout and "7860" in proc.stdout and "127.0.0.1" in proc.stdout


# Runs `python app.py ...` with an audit hook that reports every socket connection and, at the first
# one, the environment the app set for itself.
AUDITED_START = """
import os, runpy, sys
def hook(event, args):
    if event == "socket.connect":
        if not getattr(hook, "env_shown", False):
            hook.env_shown = True
            env = os.environ.get("HF_HUB_OFFLINE"), os.environ.get("GRADIO_ANALYTICS_ENABLED")
            sys.stderr.write("ENV %s %s\\n" % env)
        # one write a line: a process ended, or another thread's line, mid-line leaves no half line
        sys.stderr.write(f"CONNECT {args[1]}\\n")
        sys.stderr.flush()
sys.addaudithook(hook)
sys.path.insert(0, os.getcwd())
sys.argv = ["app.py", *sys.argv[1:]]
runpy.run_path("app.py", run_name="__main__")
"""


def test_start_up_is_offline_without_analytics_and_connects_nowhere_but_itself(tiny_app, tmp_path):
    tiny_app.model.save_pretrained(tmp_path / "ckpt")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "GRADIO_ANALYTICS_ENABLED", "HF_HUB_DISABLE_TELEMETRY")}
    proc = subprocess.Popen([sys.executable, "-c", AUDITED_START, "--checkpoint", str(tmp_path / "ckpt"),
                             "--index", str(tiny_app.index.folder), "--port", str(port)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    watchdog = threading.Timer(180, proc.kill)  # a start-up that hangs ends the read below, not CI
    watchdog.start()
    try:
        for line in proc.stdout:  # until the app serves (Gradio checks its own URL once up)
            lines.append(line)
            if "Running on local URL" in line:
                break
        httpx.get(f"http://127.0.0.1:{port}/", timeout=30).raise_for_status()
    finally:
        watchdog.cancel()
        proc.terminate()
        lines += proc.communicate(timeout=60)[0].splitlines(keepends=True)
    assert any("Running on local URL" in line for line in lines), "".join(lines[-20:])
    assert "ENV 1 False\n" in lines, "HF_HUB_OFFLINE=1 and GRADIO_ANALYTICS_ENABLED=False by default"
    connections = [line for line in lines if line.startswith("CONNECT")]
    assert connections and all(line.startswith("CONNECT ('127.0.0.1'") for line in connections), connections


def test_only_the_hub_presets_and_hub_checkpoints_turn_the_hub_on(tmp_path):
    import app
    assert app.asks_for_hub("fromage") and app.asks_for_hub("fromage-vis4") and not app.asks_for_hub("demo")
    (tmp_path / "grounded_config.json").write_text('{"lm": "facebook/opt-6.7b", "visual": "ViT-L-14"}')
    assert app.asks_for_hub(str(tmp_path))
    (tmp_path / "grounded_config.json").write_text('{"lm": "smollm2-135m-instruct", "visual": "local-dir:clip"}')
    assert not app.asks_for_hub(str(tmp_path))


def test_demo_gallery_is_built_once_reused_kept_apart_per_image_mapping_and_rebuilt_keeping_shared_uploads(
        tiny_lm_dir, tiny_clip_dir, tmp_path, capsys):
    import app
    from model.grounded import GroundedLM
    from retrieval_index.index import ImageIndex

    model = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir), quantize="none", device="cpu")
    index_dir = app.demo_gallery(model, tmp_path, size=5)
    assert "Indexing the demo gallery" in capsys.readouterr().err
    assert (tmp_path / "captions.tsv").read_text().count("\n") == 6  # header + 5 rows
    with ImageIndex.load(index_dir, model.fingerprint) as index:
        assert len(index) == 5 and index.get(1).caption

    stamp = (index_dir / "index.faiss").stat().st_mtime_ns
    assert app.demo_gallery(model, tmp_path, size=5) == index_dir
    assert capsys.readouterr().err == "" and (index_dir / "index.faiss").stat().st_mtime_ns == stamp

    shared = index_dir / app.SHARED_UPLOADS / "mine.png"  # an upload its owner added to the collection
    shared.parent.mkdir()
    shared.write_bytes(b"png")
    other = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir), quantize="none", device="cpu")
    other.image_mapping.weight.data += 1  # another checkpoint's image mapping: the first index's vectors do not fit
    other_dir = app.demo_gallery(other, tmp_path, size=5)
    assert other_dir != index_dir and "Indexing the demo gallery" in capsys.readouterr().err
    with ImageIndex.load(other_dir, other.fingerprint) as index:
        assert len(index) == 5
    assert app.demo_gallery(model, tmp_path, size=5) == index_dir, "switching back reuses the first index"
    assert (index_dir / "index.faiss").stat().st_mtime_ns == stamp and shared.read_bytes() == b"png"
    index_dir.rename(tmp_path / "index")  # the layout before, one index for every mapping: its own adopts it
    assert app.demo_gallery(model, tmp_path, size=5) == index_dir and not (tmp_path / "index").exists()
    assert (index_dir / "index.faiss").stat().st_mtime_ns == stamp and shared.read_bytes() == b"png"

    uploads = other_dir / app.SHARED_UPLOADS  # what users shared into an index that is then damaged: kept
    uploads.mkdir()
    red_sha = "ab" * 32  # named by its upload's sha256
    Image.new("RGB", (32, 32), "red").save(uploads / f"{red_sha}.png")
    Image.new("RGB", (32, 32), "blue").save(uploads / f"{'cd' * 16}.png")  # named as uploads were before
    (uploads / "broken.png").write_bytes(b"not a png")
    shared_files = sorted(uploads.iterdir())
    (other_dir / "index.json").write_text("{ half a file")
    app.demo_gallery(other, tmp_path, size=5)
    err = capsys.readouterr().err
    assert "index is damaged" in err and "broken.png" in err and "Shared uploads indexed again: 2." in err
    assert sorted(uploads.iterdir()) == shared_files
    with ImageIndex.load(other_dir, other.fingerprint) as index:
        assert len(index) == 7 and index.get(index.id_for_sha256(red_sha)).caption == "Shared by a user"


def test_only_assets_and_the_collection_folders_are_allowed(tiny_app):
    import app
    allowed = {Path(p) for p in tiny_app.allowed_paths}
    assert app.ASSETS in allowed and tiny_app.index.folder not in allowed
    assert any((p / "test-0000.png").is_file() for p in allowed)
    assert REPO not in allowed and Path.home() not in allowed


# ---- chatting ------------------------------------------------------------------------------------

def test_reply_streams_and_a_retrieved_image_appears_inline_with_caption_and_score(tiny_app, session):
    outputs = run(tiny_app.chat({"text": "show me a red circle", "files": []}, session,
                                max_new_tokens=8, **RETRIEVE))
    assert outputs[0][1] is None, "the input box clears as soon as the message is taken"
    assert len(outputs) > 4, "the reply streams: one update per event"
    chat = final_chat(outputs)
    assert [m["role"] for m in chat] == ["user", "assistant"]
    content = chat[1]["content"]
    image_at = next(i for i, c in enumerate(content) if isinstance(c, dict))
    assert Path(content[image_at]["path"]).is_file()
    assert "score" in content[image_at + 1] and "ret-caption" in content[image_at + 1]
    assert any(isinstance(c, str) and c.strip() for c in content[image_at + 2:]), "text goes on after the image"

    exchange = session.exchanges[0]
    assert len(exchange.retrieved) == 1
    hit = tiny_app.index.get(exchange.retrieved[0])
    assert hit.caption in content[image_at + 1]
    assert any(isinstance(p, Image.Image) for p in exchange.reply.parts), "the next turns see the image"


def test_the_next_turn_sees_the_history_and_never_repeats_an_image(tiny_app, session):
    run(tiny_app.chat({"text": "show me a circle", "files": []}, session, max_new_tokens=4, **RETRIEVE))
    run(tiny_app.chat({"text": "another one", "files": []}, session, max_new_tokens=4, **RETRIEVE))
    first, second = session.exchanges
    assert first.retrieved and second.retrieved and first.retrieved != second.retrieved
    turns = session.turns()
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[1].images, "the first reply's image is part of the conversation"


def test_an_uploaded_image_goes_to_the_model_and_shows_in_the_users_bubble(tiny_app, session, tmp_path):
    path = upload(tmp_path, "photo.png", png_bytes(Image.new("RGB", (64, 48), "orange")))
    chat = final_chat(run(tiny_app.chat({"text": "what is this?", "files": [path]}, session,
                                        max_new_tokens=3, max_images=0)))
    user = chat[0]
    assert user["role"] == "user" and texts(user) == "what is this?" and len(images_in(user)) == 1
    parts = session.exchanges[0].user.parts
    assert isinstance(parts[0], Image.Image) and parts[0].size == (64, 48) and parts[1] == "what is this?"


def test_thinking_first_shows_the_monologue_above_the_answer_and_only_about_an_image(tiny_lm_dir, tiny_clip_dir,
                                                                                   tmp_path):
    import app
    thinking = make_tiny_app(tiny_lm_dir, tiny_clip_dir, tmp_path / "gallery")
    data = png_bytes(Image.new("RGB", (64, 48), "orange"))
    heard = teach_reasoner(thinking.model, app.load_image(data), "What colour is it?", "Orange.",
                           "The Observer said so.")
    session = app.Session()
    outputs = run(thinking.chat({"text": "What colour is it?", "files": [upload(tmp_path, "photo.png", data)]}, session,
                                max_new_tokens=16, max_images=0, monologue=True))
    monologue = [m for m in final_chat(outputs) if m.get("metadata", {}).get("title") == "Inner monologue"]
    assert len(monologue) == 1 and monologue[0]["metadata"]["status"] == "done"
    assert monologue[0]["content"] == (f"**Reasoner:** Q1: What colour is it?\n\n**Observer:** A1: {heard}\n\n"
                                       f"**Reasoner:** Reason: The Observer said so.")
    assert any(m.get("metadata", {}).get("status") == "pending" for chat, _ in outputs[1:-1] for m in chat), \
        "the monologue shows while it is written"
    assert final_chat(outputs).index(monologue[0]) == len(final_chat(outputs)) - 2, "right above the answer"
    assert texts(final_chat(outputs)[-1]) == "Orange. The Observer said so."
    assert session.exchanges[0].reply.text == "Orange. The Observer said so.", "the next turns see the answer only"

    chat = final_chat(run(thinking.chat({"text": "And now?", "files": []}, session, max_new_tokens=4, max_images=0)))
    assert sum(m.get("metadata", {}).get("title") == "Inner monologue" for m in chat) == 1, "switched off"
    chat = final_chat(run(thinking.chat({"text": "hello", "files": []}, app.Session(), max_new_tokens=4, max_images=0,
                                        monologue=True)))
    assert not any(m.get("metadata") for m in chat), "no image in the conversation: no monologue, and no word of one"


def test_a_question_about_an_image_shows_where_the_model_looked_unless_switched_off(tiny_lm_dir, tiny_clip_dir,
                                                                                    tmp_path):
    import app
    looking = make_tiny_app(tiny_lm_dir, tiny_clip_dir, tmp_path / "gallery", request_tokens=2)
    path = upload(tmp_path, "photo.png", png_bytes(Image.new("RGB", (64, 48), "orange")))
    session = app.Session()
    chat = final_chat(run(looking.chat({"text": "what colour is it?", "files": [path]}, session,
                                       max_new_tokens=3, max_images=0)))
    reply = chat[-1]
    looked = [c for c in reply["content"] if isinstance(c, dict)]
    assert len(looked) == 1 and looked[0]["alt_text"].startswith("Looked here first")
    assert Image.open(looked[0]["path"]).size == (256, 256), "the square the encoder saw, with the heat map"
    assert "looked-caption" in " ".join(c for c in reply["content"] if isinstance(c, str))
    assert not any(isinstance(p, Image.Image) for p in session.exchanges[0].reply.parts), "shown, not said"

    chat = final_chat(run(looking.chat({"text": "and its shape?", "files": []}, session, max_new_tokens=3,
                                       max_images=0, interactive=False)))
    assert images_in(chat[-1]) == [], "switched off: it answers without looking"
    chat = final_chat(run(looking.chat({"text": "and now?", "files": []}, session, max_new_tokens=3, max_images=0)))
    assert len(images_in(chat[-1])) == 1, "a follow-up looks at the image asked about before"
    chat = final_chat(run(looking.chat({"text": "hello there", "files": []}, app.Session(), max_new_tokens=3,
                                       max_images=0)))
    assert images_in(chat[-1]) == [], "no image in the conversation: nothing to look at"


def test_an_empty_message_is_ignored(tiny_app, session):
    outputs = run(tiny_app.chat({"text": "   \n", "files": []}, session))
    assert final_chat(outputs) == [] and session.exchanges == []


def test_a_very_long_message_is_cut_to_fit_the_context_with_a_visible_notice(tiny_app, session):
    long = "the quick brown fox jumps over the lazy dog. " * 300  # far beyond the tiny LM's 512 positions
    chat = final_chat(run(tiny_app.chat({"text": long, "files": []}, session, max_new_tokens=4, max_images=0)))
    assert "cut to its first" in notes(chat)
    assert chat[-1]["role"] == "assistant" and not chat[-1].get("metadata")


def test_a_model_error_shows_its_real_cause_and_the_session_goes_on(tiny_app, session, monkeypatch):
    def broken_search(*args, **kwargs):
        raise RuntimeError("the index is on a disk that went away")

    monkeypatch.setattr(tiny_app.index, "search", broken_search)
    chat = final_chat(run(tiny_app.chat({"text": "show me a square", "files": []}, session,
                                        max_new_tokens=4, **RETRIEVE)))
    assert "RuntimeError: the index is on a disk that went away" in notes(chat)
    monkeypatch.undo()
    chat = final_chat(run(tiny_app.chat({"text": "hello", "files": []}, session, max_new_tokens=3, max_images=0)))
    assert chat[-1]["role"] == "assistant" and not chat[-1].get("metadata")


def bad_and_odd_uploads(folder: Path) -> dict[str, str]:
    """Each kind of upload the issue names, as a file."""
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    good = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)))
    corrupt = good[:60] + bytes(60) + good[120:]  # a valid header, then zeros where the pixel data was
    huge = Image.new("1", (8000, 6000))  # 48 MP, a few KB as a 1-bit PNG
    return {
        "corrupt.png": upload(folder, "corrupt.png", corrupt),
        "truncated.png": upload(folder, "truncated.png", good[: len(good) // 2]),
        "empty.png": upload(folder, "empty.png", b""),
        "notes.png": upload(folder, "notes.png", b"this is a text file, not a picture\n"),
        "huge.png": upload(folder, "huge.png", png_bytes(huge)),
        "cmyk.jpg": upload(folder, "cmyk.jpg", png_bytes(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG")),
        "deep.png": upload(folder, "deep.png", png_bytes(Image.fromarray(np.full((16, 16), 40000, np.uint16)))),
        "alpha.png": upload(folder, "alpha.png", png_bytes(Image.new("RGBA", (16, 16), (255, 0, 0, 0)))),
        "animated.gif": upload(folder, "animated.gif", animated.getvalue()),
    }


@pytest.mark.parametrize("name, message, used", [
    ("corrupt.png", "was not used: truncated or corrupt", False),
    ("truncated.png", "was not used: truncated or corrupt", False),
    ("empty.png", "was not used: empty file (0 bytes)", False),
    ("notes.png", "was not used: not an image", False),
    ("huge.png", "was not used: image too large: 8000x6000", False),
    ("cmyk.jpg", "is a CMYK image: converted to RGB", True),
    ("deep.png", "has 16-bit pixels: scaled to 8 bits", True),
    ("alpha.png", "has transparency: the model sees it on a white background", True),
    ("animated.gif", "is animated (2 frames): the model sees its first frame", True),
])
def test_every_kind_of_odd_upload_gets_a_clear_message_and_the_session_goes_on(
        tiny_app, session, tmp_path, name, message, used):
    path = bad_and_odd_uploads(tmp_path)[name]
    chat = final_chat(run(tiny_app.chat({"text": "look", "files": [path]}, session, max_new_tokens=2,
                                        max_images=0)))
    assert f"**{name}** {message}" in notes(chat)
    user = session.exchanges[0].user
    assert len(user.images) == (1 if used else 0) and user.text == "look"
    assert chat[-1]["role"] == "assistant" and not chat[-1].get("metadata"), "the reply still comes"
    chat = final_chat(run(tiny_app.chat({"text": "and now?", "files": []}, session, max_new_tokens=2,
                                        max_images=0)))
    assert len(session.exchanges) == 2 and chat[-1]["role"] == "assistant"


def test_a_message_of_only_unusable_files_is_answered_by_the_notices_alone(tiny_app, session, tmp_path):
    path = upload(tmp_path, "empty.png", b"")
    chat = final_chat(run(tiny_app.chat({"text": "", "files": [path]}, session)))
    assert texts(chat[0]) == "Attached: empty.png" and "empty file" in notes(chat)
    assert session.exchanges[0].user is None and session.turns() == []


# ---- sessions ------------------------------------------------------------------------------------

def test_sessions_are_isolated_and_uploads_stay_in_their_session_by_default(tiny_app, tmp_path):
    import app
    alice, bob = app.Session(), app.Session()
    path = upload(tmp_path, "secret.png", png_bytes(Image.new("RGB", (40, 40), (12, 34, 56))))
    before = len(tiny_app.index)
    run(tiny_app.chat({"text": "my picture", "files": [path]}, alice, max_new_tokens=3, max_images=0))
    run(tiny_app.chat({"text": "show me anything", "files": []}, bob, max_new_tokens=3, **RETRIEVE))
    assert len(tiny_app.index) == before, "an upload is not added to the collection unless asked"
    assert not any(t.images for t in bob.turns() if t.role == "user")
    secret = alice.exchanges[0].user.images[0]
    assert all(im.tobytes() != secret.tobytes() for t in bob.turns() for im in t.images)


def test_sharing_an_upload_adds_it_to_the_collection_for_everyone(tiny_app, tmp_path):
    import app
    from model.images import file_sha256
    data = png_bytes(Image.new("RGB", (40, 40), (200, 10, 100)))
    path = upload(tmp_path, "shared.png", data)
    alice = app.Session()
    before = len(tiny_app.index)
    run(tiny_app.chat({"text": "for everyone", "files": [path]}, alice, max_new_tokens=2, max_images=0,
                      share_uploads=True))
    id_ = tiny_app.index.id_for_sha256(file_sha256(data))
    assert id_ is not None and len(tiny_app.index) == before + 1
    record = tiny_app.index.get(id_)
    assert record.source == "upload" and Path(record.path).is_file()
    assert Path(record.path).stem == file_sha256(data), "named by its sha256: an index rebuilt around it keeps it"
    assert any(Path(record.path).is_relative_to(p) for p in tiny_app.allowed_paths), "it is served"
    assert id_ in alice.shown_ids(), "the sharer is never shown their own image back"
    hits = tiny_app.index.search(tiny_app.model.embed_images([Image.open(record.path)])[0], k=1)
    assert hits[0].id == id_


# ---- stop, retry, undo, clear --------------------------------------------------------------------

def test_stop_ends_the_reply_mid_way_and_keeps_what_was_said(tiny_app, session):
    stream = tiny_app.chat({"text": "tell me a long story", "files": []}, session, max_new_tokens=200,
                           max_images=0)
    for _ in range(5):
        next(stream)
    said = "".join(p for p in session.exchanges[0].reply.parts if isinstance(p, str))
    assert said
    chat = tiny_app.stop(session)
    assert "Stopped" in " ".join(str(c) for c in chat[-1]["content"])
    rest = list(stream)
    assert len(rest) == 1, "no more tokens after Stop"
    reply = session.exchanges[0].reply
    assert "".join(p for p in reply.parts if isinstance(p, str)) == said
    assert session.replying is None
    chat = final_chat(run(tiny_app.chat({"text": "go on", "files": []}, session, max_new_tokens=2,
                                        max_images=0)))
    assert "Stopped" not in " ".join(str(c) for c in chat[-1]["content"]), "the next reply is not stopped"


def test_a_reply_whose_job_gradio_drops_is_marked_stopped(tiny_app, session):
    stream = tiny_app.chat({"text": "tell me a long story", "files": []}, session, max_new_tokens=200,
                           max_images=0)
    for _ in range(5):
        next(stream)
    stream.close()  # what Gradio does to a cancelled job (Stop in the browser, a closed tab)
    assert session.exchanges[0].stopped and session.replying is None
    assert "Stopped" in " ".join(str(c) for c in session.messages()[-1]["content"])


def test_retry_answers_the_last_message_again_with_new_settings(tiny_app, session):
    run(tiny_app.chat({"text": "show me a star", "files": []}, session, max_new_tokens=4, max_images=0))
    assert not session.exchanges[0].retrieved
    chat = final_chat(run(tiny_app.retry(session, 0.0, 1.0, 4, 3.0, 1)))
    assert len(session.exchanges) == 1 and len(session.exchanges[0].retrieved) == 1
    assert [m["role"] for m in chat] == ["user", "assistant"] and images_in(chat[1])


def test_undo_takes_back_the_last_message_into_the_input_box(tiny_app, session, tmp_path):
    path = upload(tmp_path, "a.png", png_bytes(Image.new("RGB", (20, 20), "red")))
    run(tiny_app.chat({"text": "first", "files": []}, session, max_new_tokens=2, max_images=0))
    run(tiny_app.chat({"text": "second", "files": [path]}, session, max_new_tokens=2, max_images=0))
    chat, box = tiny_app.undo(session)
    assert box == {"text": "second", "files": [path]}
    assert [texts(m) for m in chat if m["role"] == "user"] == ["first"]
    assert len(session.turns()) == 2


def test_clear_starts_over(tiny_app, session):
    run(tiny_app.chat({"text": "show me a circle", "files": []}, session, max_new_tokens=2, **RETRIEVE))
    assert tiny_app.clear(session) == [] and session.turns() == [] and session.shown_ids() == set()


# ---- gallery -------------------------------------------------------------------------------------

def test_the_gallery_pages_through_the_collection(tiny_app, monkeypatch):
    import app
    monkeypatch.setattr(app, "GALLERY_PAGE", 5)
    items, label, page = tiny_app.browse(0)
    assert page == 0 and len(items) == 5 and label.startswith("Images 1–5 of")
    assert all(Path(path).is_file() and caption for path, caption in items)
    last = -(-len(tiny_app.index) // 5) - 1
    items, label, page = tiny_app.browse(99)
    assert page == last and 0 < len(items) <= 5
    assert tiny_app.browse(-3)[2] == 0


def test_gallery_search_ranks_the_collection_by_the_models_retrieval_vector(tiny_app):
    import app
    items, label = tiny_app.search("a large red circle")
    assert "a large red circle" in label and len(items) == min(len(tiny_app.index), app.GALLERY_PAGE)
    scores = [float(caption.rsplit("score ", 1)[1]) for _, caption in items]
    assert scores == sorted(scores, reverse=True)
    query = tiny_app.model.text_query("a large red circle")
    assert items[0][0] == tiny_app.index.search(query, k=1)[0].path
    assert tiny_app.search("  ")[1].startswith("Images 1–"), "an empty search shows the collection"
    assert tiny_app.search(" ?! ") == ([], "“?!” names nothing to search for.")


def test_a_model_that_does_not_retrieve_shows_no_image_and_says_so(tiny_lm_dir, tiny_clip_dir, tmp_path):
    """A checkpoint ESPER aligned without captions describes and chats; its `[RET]` never comes, whatever the
    settings, and the header and the gallery search say why."""
    import app
    describer = make_tiny_app(tiny_lm_dir, tiny_clip_dir, tmp_path, retrieves=False)
    chat = final_chat(run(describer.chat({"text": "show me a red circle", "files": []}, app.Session(),
                                         max_new_tokens=8, **RETRIEVE)))
    assert not images_in(chat[1]) and texts(chat[1]), "it goes on writing where it would have retrieved"
    assert "does not retrieve" in app.header_html("esper-shapes", 12, retrieves=False)
    offered = [example["text"] for example in describer.example_prompts()]
    assert offered == [text for text, image in app.EXAMPLE_PROMPTS if image], "no request for a picture offered"
    items, label = describer.search("a large red circle")
    assert label.startswith("Images 1–") and label.endswith(app.NO_RETRIEVAL) and items == describer.browse(0)[0]


# ---- with the batched decoder (`--max-batch`) ---------------------------------------------------

@pytest.fixture(scope="module")
def batched(tiny_lm_dir, tiny_clip_dir, tmp_path_factory):
    """A tiny app of its own behind an engine of one row and one place in line; a gate holds its decoding."""
    import app
    from model.serving import DecodeEngine

    plain = make_tiny_app(tiny_lm_dir, tiny_clip_dir, tmp_path_factory.mktemp("batched-gallery"), gallery_size=4)
    engine = DecodeEngine(plain.model, max_batch=1, max_waiting=1)
    yield app.ChatApp(plain.model, plain.index, title="tiny", engine=engine), DecodeGate(plain.model)
    engine.close()


def take_the_only_row(chat_app, gate: DecodeGate) -> threading.Thread:
    """A reply of another session that takes the engine's one row and stays there while the gate is closed."""
    import app
    first = threading.Thread(target=run, args=(chat_app.chat({"text": "hello", "files": []}, app.Session(),
                                                             max_new_tokens=4, max_images=0),))
    first.start()
    assert gate.held.wait(30), "the first reply holds the only row"
    return first


def test_a_reply_waits_for_the_batched_decoder_with_its_place_shown_then_comes(batched):
    import app
    chat_app, gate = batched
    with gate.closed():
        first = take_the_only_row(chat_app, gate)
        second = chat_app.chat({"text": "and me?", "files": []}, app.Session(), max_new_tokens=4, max_images=0)
        next(second)  # the message itself
        waiting = final_chat([next(second)])
        assert "Waiting for the model: yours is next." in texts(waiting[-1])
    chat = final_chat(run(second))
    first.join()
    assert chat[-1]["role"] == "assistant" and "Waiting" not in texts(chat[-1])


def test_beyond_the_waiting_line_a_message_is_told_the_server_is_busy(batched):
    import app
    chat_app, gate = batched
    with gate.closed():
        first = take_the_only_row(chat_app, gate)
        second = chat_app.chat({"text": "me too", "files": []}, app.Session(), max_new_tokens=4, max_images=0)
        next(second)
        assert "yours is next" in texts(final_chat([next(second)])[-1]), "the second takes the one place in line"
        chat = final_chat(run(chat_app.chat({"text": "and me?", "files": []}, app.Session(), max_new_tokens=4,
                                            max_images=0)))
    first.join()
    run(second)
    assert "The server is busy" in notes(chat)
