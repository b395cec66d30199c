"""The app over HTTP: `gradio_client` against the app launched in this process on the tiny model.

The model is slowed to about a real CPU's pace (20 ms a step) so that "while one reply is running"
is a state the tests can observe; no assertion is about time.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from conftest import DecodeGate, make_tiny_app, png_bytes, serve

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "assets" / "examples" / "red-hexagon.png"
RETRIEVE = dict(ret_scale=3.0, max_images=1)


@pytest.fixture(scope="module")
def served(tiny_lm_dir, tiny_clip_dir, tmp_path_factory):
    chat_app = make_tiny_app(tiny_lm_dir, tiny_clip_dir, tmp_path_factory.mktemp("api-gallery"))
    gate = DecodeGate(chat_app.model)
    demo, url = serve(chat_app, max_concurrency=2)
    yield chat_app, url, gate
    demo.close()


@pytest.fixture
def client(served) -> Client:
    return Client(served[1], verbose=False)


def image_file(folder: Path, name: str, colour: tuple[int, int, int]) -> str:
    path = folder / name
    path.write_bytes(png_bytes(Image.new("RGB", (48, 48), colour)))
    return str(path)


def files_in(message: dict) -> list[str]:
    return [c["file"] for c in message["content"] if c["type"] == "file"]


def text_of(message: dict) -> str:
    return " ".join(c["text"] for c in message["content"] if c["type"] == "text")


def digest(path: str) -> str:
    return hashlib.sha256(Image.open(path).convert("RGB").tobytes()).hexdigest()


def wait_for(condition, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def test_the_named_endpoints_are_documented_with_the_settings_as_parameters(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/chat", "/stop", "/retry", "/undo", "/clear", "/search", "/browse"} <= set(endpoints)
    parameters = {p["parameter_name"]: p.get("parameter_default") for p in endpoints["/chat"]["parameters"]}
    assert parameters == {"message": {"text": "", "files": []}, "temperature": 0.0, "top_p": 1.0,
                          "max_new_tokens": 128, "ret_scale": 1.0, "max_images": 2, "share_uploads": False,
                          "interactive": False, "monologue": False}, \
        "looking is on by default only for a model with a request module; thinking first is always asked for"


def test_chat_takes_text_and_files_and_streams_the_reply_with_the_retrieved_image(client):
    job = client.submit({"text": "What is this? Show me another.", "files": [handle_file(str(EXAMPLE))]},
                        max_new_tokens=8, **RETRIEVE, api_name="/chat")
    updates = [chat for chat, _ in job]
    assert len(updates) > 3, "one update per generated event, not one at the end"
    user, reply = updates[-1]
    assert user["role"] == "user" and text_of(user) == "What is this? Show me another."
    assert digest(files_in(user)[0]) == digest(str(EXAMPLE))
    assert reply["role"] == "assistant" and len(files_in(reply)) == 1
    assert "score" in text_of(reply)
    lengths = [len(str(chat[-1]["content"])) for chat in updates if chat[-1]["role"] == "assistant"]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1], "the reply grows as it streams"


def test_a_bad_upload_gets_a_message_in_the_chat_and_the_reply_still_comes(client, tmp_path):
    bad = tmp_path / "holiday.png"
    bad.write_text("not really a picture")
    chat, _ = client.predict({"text": "look at this", "files": [handle_file(str(bad))]}, max_new_tokens=3,
                             max_images=0, api_name="/chat")
    assert any("**holiday.png** was not used: not an image" in text_of(m) for m in chat if m["metadata"])
    assert chat[-1]["role"] == "assistant" and not chat[-1]["metadata"]


def test_sessions_are_isolated_while_they_run_at_the_same_time(served, tmp_path):
    alice, bob = Client(served[1], verbose=False), Client(served[1], verbose=False)
    mine = {"alice": image_file(tmp_path, "alice.png", (250, 10, 10)),
            "bob": image_file(tmp_path, "bob.png", (10, 10, 250))}
    jobs = {name: c.submit({"text": f"I am {name}", "files": [handle_file(mine[name])]}, max_new_tokens=20,
                           **RETRIEVE, api_name="/chat") for name, c in (("alice", alice), ("bob", bob))}
    chats = {name: job.result()[0] for name, job in jobs.items()}
    second = alice.predict({"text": "and again", "files": []}, max_new_tokens=4, **RETRIEVE, api_name="/chat")[0]
    for name, other in (("alice", "bob"), ("bob", "alice")):
        chat = chats[name] if name == "bob" else second
        assert f"I am {other}" not in " ".join(text_of(m) for m in chat)
        shown = {digest(f) for m in chat for f in files_in(m)}
        assert digest(mine[name]) in shown and digest(mine[other]) not in shown
    assert [text_of(m) for m in second if m["role"] == "user"] == ["I am alice", "and again"]


def test_the_queue_bounds_concurrency_and_other_sessions_keep_working(served):
    _, url, gate = served
    with gate.closed():  # the replies that run stay running until the checks are done
        waiting = [Client(url, verbose=False).submit({"text": f"long story {i}", "files": []}, max_new_tokens=20,
                                                     max_images=0, api_name="/chat") for i in range(3)]

        def codes() -> list[str]:
            return sorted(job.status().code.value for job in waiting)

        wait_for(lambda: codes() == ["IN_QUEUE", "ITERATING", "ITERATING"], "two running replies and a third queued")
        items, status = Client(url, verbose=False).predict("a red circle", api_name="/search")
        assert items and "matches" in status, "the gallery answers while the replies run"
        assert codes() == ["IN_QUEUE", "ITERATING", "ITERATING"], "max concurrency 2: the third still waits"
    for job in waiting:
        job.result()  # and all three finish once decoding goes on


def test_stop_cancels_the_running_reply_of_its_own_session_only(served):
    _, url, gate = served
    alice, bob = Client(url, verbose=False), Client(url, verbose=False)
    with gate.closed():
        mine = alice.submit({"text": "a long story please", "files": []}, max_new_tokens=300, max_images=0,
                            api_name="/chat")
        assert gate.held.wait(60), "the reply started"
        theirs = bob.submit({"text": "mine goes on", "files": []}, max_new_tokens=40, max_images=0,
                            api_name="/chat")
        chat = alice.predict(api_name="/stop")
        assert "Stopped" in text_of(chat[-1])
    stopped = mine.result()[0]
    assert "Stopped" in text_of(stopped[-1]) and len(text_of(stopped[-1]).split()) < 20, "it ended where Stop came"
    final = theirs.result()[0]
    assert "Stopped" not in text_of(final[-1]) and final[-1]["role"] == "assistant"


def test_undo_and_clear_through_the_api(client):
    client.predict({"text": "first", "files": []}, max_new_tokens=2, max_images=0, api_name="/chat")
    client.predict({"text": "second", "files": []}, max_new_tokens=2, max_images=0, api_name="/chat")
    chat, box = client.predict(api_name="/undo")
    assert [text_of(m) for m in chat if m["role"] == "user"] == ["first"] and box["text"] == "second"
    assert client.predict(api_name="/clear") == []


def test_only_assets_the_collection_and_the_upload_folder_are_served(served, client):
    chat_app, url, _ = served
    chat, _ = client.predict({"text": "hello", "files": [handle_file(str(EXAMPLE))]}, max_new_tokens=2,
                             max_images=0, api_name="/chat")
    shown = next(p for p in chat_app.display_dir.iterdir() if p.suffix == ".png")
    gallery_image = chat_app.index.get(1).path

    def status(path: str) -> int:
        return httpx.get(f"{url}gradio_api/file={path}", timeout=30).status_code

    assert status(str(REPO / "assets" / "app.css")) == 200
    assert status(str(EXAMPLE)) == 200
    assert status(gallery_image) == 200
    assert status(str(shown)) == 200
    for refused in (REPO / "app.py", REPO / "model" / "grounded.py", Path("/etc/passwd"),
                    Path(gallery_image).parent.parent / "captions.tsv",
                    chat_app.index.folder / "meta.sqlite"):
        assert status(str(refused)) in (403, 404), refused


@pytest.fixture(scope="module")
def served_batched(tiny_lm_dir, tiny_clip_dir, tmp_path_factory):
    """The app as `python app.py --max-batch 4` serves it: every reply decodes in one shared batch."""
    import app
    from model.serving import DecodeEngine

    plain = make_tiny_app(tiny_lm_dir, tiny_clip_dir, tmp_path_factory.mktemp("batched-api-gallery"))
    engine = DecodeEngine(plain.model, max_batch=4, max_waiting=12)
    demo, url = serve(app.ChatApp(plain.model, plain.index, title="tiny", engine=engine), max_concurrency=None)
    yield url
    demo.close()
    engine.close()


def test_six_sessions_decoded_in_one_batch_each_see_only_their_own_conversation(served_batched, tmp_path):
    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (250, 250, 10), (10, 250, 250), (250, 10, 250)]
    uploads = {i: image_file(tmp_path, f"user-{i}.png", c) for i, c in enumerate(colours)}
    clients = {i: Client(served_batched, verbose=False) for i in uploads}
    jobs = {i: clients[i].submit({"text": f"I am user {i}", "files": [handle_file(uploads[i])]}, max_new_tokens=12,
                                 temperature=1.0, **RETRIEVE, api_name="/chat") for i in uploads}
    chats = {i: job.result()[0] for i, job in jobs.items()}
    for i, chat in chats.items():
        assert [text_of(m) for m in chat if m["role"] == "user"] == [f"I am user {i}"]
        assert chat[-1]["role"] == "assistant" and len(files_in(chat[-1])) == 1, "its reply, with its retrieval"
        shown = {digest(f) for m in chat for f in files_in(m)}
        assert shown & {digest(p) for p in uploads.values()} == {digest(uploads[i])}
