"""The README's picture of the chat: a running app, driven in Debian's Chromium through Playwright.

    python app.py &                                   # the demo, on http://127.0.0.1:7860
    python -m docs.screenshot --out docs/screenshot.png
    python -m docs.screenshot --monologue --out docs/monologue.png
    python -m docs.screenshot --looking --out docs/looked.png

It sends the chat's messages in one conversation, with the app's default settings, and captures the
whole page once every reply is complete: a picture requested and shown inline, an uploaded scene
described, a photograph (scikit-image's sample cat) answered with the note that the demo was trained on
another kind of image, and another picture asked for like the second of them (the upload). With `--monologue`: "Think before answering" on, a compound question about an uploaded
scene, and the inner monologue opened above the answer. With `--looking`: a question about an uploaded scene and a
follow-up about the same scene, each answer with where the model looked first.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

from tests.conftest import CHROMIUM, FLAGS, REPLY_DONE  # the browser tests' Chromium, driven the same way

ROOT = Path(__file__).resolve().parents[1]


def cat_photograph() -> Path:
    import skimage.data
    return Path(skimage.data.__file__).parent / "chelsea.png"


MESSAGES = (("Find an image of a large blue circle in the centre.", None),
            ("Describe this picture.", ROOT / "assets" / "examples" / "two-shapes.png"),
            ("And what is in this one?", cat_photograph()),
            ("Show me another picture like the second one.", None))
MONOLOGUE = (("Are the cross and the star the same size?", ROOT / "assets" / "examples" / "two-shapes.png"),)
LOOKING = (("What shape is on the left?", ROOT / "assets" / "examples" / "two-shapes.png"),
           ("And what colour is the shape on the right?", None))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:7860/")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshot.png")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for each reply")
    scenario = p.add_mutually_exclusive_group()
    scenario.add_argument("--monologue", action="store_true", help="think before answering, and show the monologue")
    scenario.add_argument("--looking", action="store_true",
                          help="questions about an upload, for an app whose checkpoint looks first (LMEye)")
    args = p.parse_args()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1360, "height": 2900})  # the chat (66% of it) shows all four
        page.goto(args.url)
        page.wait_for_selector("#message textarea")
        if args.monologue:
            page.locator("#monologue input[type=checkbox]").check()
        for text, image in MONOLOGUE if args.monologue else LOOKING if args.looking else MESSAGES:
            shown = page.locator("#chatbot .message.bot").count()
            if image is not None:
                page.locator("#message input[type=file]").set_input_files(str(image))
                page.wait_for_selector("#message img")
            page.locator("#message textarea").fill(text)
            page.locator("#message textarea").press("Enter")
            page.wait_for_function(f"document.querySelectorAll('#chatbot .message.bot').length > {shown} && "
                                   f"{REPLY_DONE}", timeout=args.timeout * 1000)
            page.wait_for_timeout(2000)  # a note can arrive before the reply: wait for the reply itself too
            page.wait_for_function(REPLY_DONE, timeout=args.timeout * 1000)
        if args.monologue:
            header = page.locator("#chatbot .thought-group .title")  # Gradio's collapsible thought message
            if "expanded" not in (header.get_attribute("class") or "").split():
                header.click()  # collapsed once the answer started: open it
            page.wait_for_timeout(800)  # the opening slides
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
