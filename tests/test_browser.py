"""The chat in a real browser: Debian's Chromium driven by Playwright against the app launched here.

Screenshots of each step are saved under pytest's base temp folder (`<basetemp>/screenshots/`, printed
at the end of the run); pass `--basetemp DIR` to keep them somewhere known.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from conftest import CHROMIUM, FLAGS, REPLY_DONE, DecodeGate, make_tiny_app, serve, teach_reasoner

EXAMPLE = Path(__file__).resolve().parents[1] / "assets" / "examples" / "red-hexagon.png"
TIMEOUT_MS = 30_000
COMPOUND = "Are the hexagon and the star the same colour?"  # the tiny model's Reasoner has learnt to think it over
expect.set_options(timeout=TIMEOUT_MS)  # generous: CI machines are slow and shared


@pytest.fixture(scope="module")
def served(tiny_lm_dir, tiny_clip_dir, tmp_path_factory):
    chat_app = make_tiny_app(tiny_lm_dir, tiny_clip_dir, tmp_path_factory.mktemp("browser-gallery"), gallery_size=40,
                             request_tokens=2)
    from model.images import load_image
    teach_reasoner(chat_app.model, load_image(EXAMPLE.read_bytes()), COMPOUND, "No.", "There is no star.")
    gate = DecodeGate(chat_app.model)
    demo, address = serve(chat_app)
    yield address, gate
    demo.close()


@pytest.fixture(scope="module")
def url(served) -> str:
    return served[0]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, url) -> Page:
    context = browser.new_context(viewport={"width": 1360, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#message textarea")
    yield page
    context.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = tmp_path_factory.getbasetemp() / "screenshots"
    folder.mkdir(exist_ok=True)
    yield folder
    print(f"\nbrowser screenshots: {folder}")


def set_slider(page: Page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def send(page: Page, text: str, image: Path | None = None) -> None:
    if image is not None:
        page.locator("#message input[type=file]").set_input_files(str(image))
        expect(page.locator("#message img")).to_have_count(1)
    page.locator("#message textarea").fill(text)
    page.locator("#message textarea").press("Enter")


def bot_messages(page: Page):
    return page.locator("#chatbot .message.bot")


def test_type_upload_and_see_the_reply_stream_with_a_retrieved_image_inline(page, shots):
    set_slider(page, "ret-scale", 3)  # the tiny model then retrieves at once
    set_slider(page, "max-images", 1)
    set_slider(page, "temperature", 1)  # sampled: visible words rather than greedy newlines
    set_slider(page, "max-new-tokens", 40)
    send(page, "What is in this picture? Show me a similar one.", EXAMPLE)

    user = page.locator("#chatbot .message.user")
    expect(user.locator("img")).to_have_count(1)
    expect(user).to_contain_text("What is in this picture?")
    expect(page.locator("#message textarea")).to_have_value("")
    caption = page.locator("#chatbot .ret-caption").first
    expect(caption).to_contain_text(re.compile(r"score -?\d\.\d\d"))
    expect(bot_messages(page).locator("img").first).to_be_visible()
    expect(page.locator("#stop")).to_be_visible()
    page.wait_for_function(REPLY_DONE, timeout=TIMEOUT_MS)
    page.screenshot(path=shots / "chat.png", full_page=True)


def test_a_question_about_an_upload_shows_where_the_model_looked_and_the_switch_turns_it_off(page, shots):
    set_slider(page, "ret-scale", 0)
    set_slider(page, "max-new-tokens", 4)
    send(page, "What colour is the shape?", EXAMPLE)
    expect(bot_messages(page).last.locator("img").first).to_be_visible()
    expect(page.locator("#chatbot .looked-caption")).to_have_count(1)
    expect(page.locator("#chatbot .looked-caption")).to_contain_text("Looked here first")
    page.wait_for_function(REPLY_DONE, timeout=TIMEOUT_MS)
    page.screenshot(path=shots / "looked.png", full_page=True)

    page.locator("#interactive input[type=checkbox]").uncheck()
    send(page, "And its shape?")
    expect(bot_messages(page)).to_have_count(2)
    page.wait_for_function(REPLY_DONE, timeout=TIMEOUT_MS)
    expect(page.locator("#chatbot .looked-caption")).to_have_count(1)


def test_an_example_fills_the_input_with_its_prompt_and_image(page):
    page.locator("#chatbot").get_by_text("What is in this picture?").click()
    expect(page.locator("#message textarea")).to_have_value("What is in this picture?")
    expect(page.locator("#message img")).to_have_count(1)
    set_slider(page, "max-new-tokens", 3)
    page.locator("#message textarea").press("Enter")
    expect(page.locator("#chatbot .message.user img")).to_have_count(1)
    expect(bot_messages(page)).to_have_count(1)


def test_stop_ends_a_reply_mid_way(page, shots, served):
    gate = served[1]
    set_slider(page, "ret-scale", 0)
    set_slider(page, "max-new-tokens", 300)
    with gate.closed():  # the reply waits mid-way until Stop has landed
        send(page, "Tell me a very long story.")
        assert gate.held.wait(TIMEOUT_MS / 1000), "the reply started"
        page.locator("#stop").click()
        # The app marks a reply Stopped only when Stop arrives while it is being generated.
        expect(page.locator("#chatbot .stopped")).to_be_visible()
    said = bot_messages(page).last.locator(".message-content").inner_html()
    page.screenshot(path=shots / "stopped.png", full_page=True)

    set_slider(page, "max-new-tokens", 3)  # and the chat goes on
    send(page, "Thanks.")
    expect(page.locator("#chatbot .message.user")).to_have_count(2)
    page.wait_for_function(REPLY_DONE, timeout=TIMEOUT_MS)
    expect(page.locator("#chatbot .stopped")).to_have_count(1)
    assert bot_messages(page).nth(0).locator(".message-content").inner_html() == said, "nothing came after Stop"


def test_the_gallery_tab_browses_and_searches_the_collection(page, shots):
    page.get_by_role("tab", name="Gallery").click()
    expect(page.locator("#gallery-status")).to_contain_text("of 40")
    expect(page.locator("#gallery-grid img").first).to_be_visible()
    page.locator("#gallery-query textarea, #gallery-query input").first.fill("a large red circle")
    page.locator("#gallery-search").click()
    expect(page.locator("#gallery-status")).to_contain_text("matches for “a large red circle”")
    expect(page.locator("#gallery-grid")).to_contain_text("score")
    page.screenshot(path=shots / "gallery.png", full_page=True)


def test_thinking_first_shows_the_inner_monologue_in_a_collapsible_message_above_the_answer(page, shots):
    set_slider(page, "ret-scale", 0)
    page.locator("#monologue input[type=checkbox]").check()
    send(page, COMPOUND, EXAMPLE)
    replies = page.locator("#chatbot [data-testid=bot]")  # one per message, grouped under one bot bubble
    expect(replies.last).to_contain_text("No. There is no star.")
    page.wait_for_function(REPLY_DONE, timeout=TIMEOUT_MS)
    expect(replies).to_have_count(2)
    monologue, answer = replies.first, replies.last
    header = page.locator("#chatbot .thought-group .title")  # Gradio's collapsible thought message
    expect(header).to_contain_text("Inner monologue")
    assert header.bounding_box()["y"] < answer.bounding_box()["y"], "the monologue comes before the answer"
    if "expanded" not in (header.get_attribute("class") or "").split():
        header.click()  # collapsed once the answer started
    expect(header).to_have_class(re.compile(r"\bexpanded\b"))
    expect(monologue.get_by_text("Reasoner:").first).to_be_visible()
    expect(monologue).to_contain_text(f"Q1: {COMPOUND}")
    expect(monologue).to_contain_text("Observer: A1:")
    page.wait_for_timeout(500)  # the opening slides
    page.screenshot(path=shots / "monologue.png", full_page=True)

    page.locator("#monologue input[type=checkbox]").uncheck()
    send(page, "And the hexagon?")
    expect(replies).not_to_have_count(2)  # the reply's parts arrive (where it looked, then its text)
    page.wait_for_function(REPLY_DONE, timeout=TIMEOUT_MS)
    expect(page.locator("#chatbot").get_by_text("Inner monologue")).to_have_count(1)
