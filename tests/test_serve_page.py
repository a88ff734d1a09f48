"""The chat page in a real browser: headless Chromium (the system's `chromium`) driven by Playwright. It loads
the page from the server, picks an adapter and the test index, asks a question, sees the answer stream in, and
opens citations: from the source list, and from an [n] inside an answer rendered by the page's own code."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("uvicorn")
playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

from model_helpers import make_tiny  # noqa: E402
from serve_helpers import BASE, ThreadServer, make_adapter, make_index  # noqa: E402

from phi3fast.model import load  # noqa: E402
from phi3fast.serve.service import Service  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no system Chromium (Debian: apt-get install -y chromium); .ci/run installs it"
)
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]  # fmt: skip
QUESTION = "What oil does the pump need?"
# Waits, not timings: on a loaded 2-core machine a streamed answer can take far longer than Playwright's 5 s default.
WAIT_MS = 180_000
playwright_api.expect.set_options(timeout=WAIT_MS)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tiny = make_tiny(tmp_path_factory)
    root = tmp_path_factory.mktemp("page")
    adapter = make_adapter(tiny, root / "ad", r=4, seed=5)
    service = Service(load(tiny), BASE, adapters={"support": adapter}, indexes={"docs": make_index(root)})
    srv = ThreadServer(service)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def page(server: ThreadServer):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page()
        pg.set_default_timeout(WAIT_MS)
        pg.goto(server.url + "/")
        yield pg
        browser.close()


def test_page_streams_a_rag_answer_and_opens_citations(page, server: ThreadServer) -> None:
    expect = playwright_api.expect
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#model option").all_inner_texts() == [BASE, "support"]
    assert page.locator("#index option").all_inner_texts() == ["(none)", "docs"]
    page.select_option("#model", "support")
    page.select_option("#index", "docs")
    page.fill("#k", "3")
    page.fill("#question", QUESTION)
    page.click("#send")
    turn = page.locator(".turn.assistant").last
    expect(turn).to_have_attribute("data-state", "done")
    answer = turn.locator(".answer").inner_text()
    # The page shows what the API answers for the same request (greedy), streamed in and then rendered.
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    api = client.chat.completions.create(
        model="support",
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        extra_body={"rag": {"index": "docs", "k": 3}},
    )
    assert answer.strip() == api.choices[0].message.content.strip()
    sources = api.model_extra["sources"]
    assert turn.locator(".sources li").count() == len(sources) > 0
    # A citation in the source list opens its passage: source, heading and text.
    turn.locator(".sources a.cite").first.click()
    dialog = page.locator("#passage")
    expect(dialog).to_be_visible()
    expect(page.locator("#passage-title")).to_contain_text(sources[0]["source"])
    if sources[0]["heading"]:
        expect(page.locator("#passage-where")).to_contain_text(sources[0]["heading"])
    assert page.locator("#passage-text").inner_text().strip() == sources[0]["text"].strip()
    page.click("#passage-close")
    expect(dialog).to_be_hidden()
    # An [n] inside an answer becomes a link to passage n (the tiny model does not write citations itself, so the
    # page's renderer gets an answer that does, with the real sources).
    page.evaluate(
        """(sources) => {
            const el = document.createElement('div'); el.id = 'rendered'; document.body.append(el);
            window.phi3fastChat.renderAnswer(el, 'The pump needs oil [2], see also [9].', sources);
        }""",
        sources,
    )
    assert len(sources) >= 2, "k=3 over the test corpus gives several passages"
    links = page.locator("#rendered a.cite")
    assert links.count() == 1  # [9] names no source: it stays text
    links.first.click()
    expect(page.locator("#passage-text")).to_have_text(sources[1]["text"])
    page.click("#passage-close")


def test_page_chats_without_an_index(page) -> None:
    expect = playwright_api.expect
    page.select_option("#model", BASE)
    page.select_option("#index", "")
    page.fill("#question", "hello")
    page.click("#send")
    turn = page.locator(".turn.assistant").last
    expect(turn).to_have_attribute("data-state", "done")
    assert turn.locator(".sources").count() == 0
    assert page.locator("#status").inner_text() == ""
