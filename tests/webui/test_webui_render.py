"""What the page draws from text it does not control: HTML in stored replies and in the
user's own messages shows as text (no dialog, no new element), the Markdown renderer's
output on hostile and ordinary input, and reasoning in a collapsed block."""

from __future__ import annotations

import re
from typing import Any

import pytest
from playwright.sync_api import Page, expect
from webui_helpers import PageWatch, api, open_app, send, set_settings, wait_for_reply

from bitserve.api.process import ServerProcess

IMG = "<img src=x onerror=alert(1)>"
SCRIPT = "<script>alert(2)</script>"
HOSTILE = [
    IMG,
    SCRIPT,
    f"**{IMG}** and `{SCRIPT}` in a paragraph",
    f"- {IMG}\n- [click](javascript:alert(3))\n\n> {SCRIPT}",
    f"```html\n</code></pre>{IMG}\n```",
    f"```\nan unclosed fence {SCRIPT}",  # as a reply looks while it streams
    f'[x](https://example.com/" onmouseover="alert(4)) and [{IMG}](https://example.com/)',
    f"# {IMG}\n<iframe src=javascript:alert(5)></iframe><svg onload=alert(6)>",
    "<style>body{display:none}</style><a href=javascript:alert(7)>link</a>",
    "> " * 5000 + IMG,  # nesting this deep is drawn as text, not recursed into
    "- " * 5000 + SCRIPT,
]
# the only elements the renderer makes
ALLOWED_TAGS = {
    "P", "BR", "STRONG", "EM", "DEL", "CODE", "PRE", "DIV", "SPAN", "BUTTON", "A", "UL", "OL",
    "LI", "BLOCKQUOTE", "HR", "H1", "H2", "H3", "H4", "H5", "H6",
}  # fmt: skip

RENDER = """async (text) => {
  const { renderMarkdown } = await import("/static/markdown.js");
  const box = document.createElement("div");
  box.append(renderMarkdown(text));
  const elements = [...box.querySelectorAll("*")];
  return {
    text: box.textContent,
    tags: elements.map((e) => e.tagName),
    attributes: elements.flatMap((e) => [...e.attributes].map((a) => `${a.name}=${a.value}`)),
    html: box.innerHTML,
  };
}"""


def render(page: Page, text: str) -> dict[str, Any]:
    result: dict[str, Any] = page.evaluate(RENDER, text)
    return result


def page_elements(page: Page) -> int:
    count: int = page.evaluate("document.querySelectorAll('img, script, iframe, svg').length")
    return count


def test_html_in_stored_messages_shows_as_text(watch: PageWatch, server: ServerProcess) -> None:
    page = watch.page
    reply = f"Sure: {IMG} and {SCRIPT}\n\n```\n{SCRIPT}\n```"
    created = api(server.url, "POST", "/v1/conversations", json={"messages": [
        {"role": "user", "content": f"Say {IMG}"},
        {"role": "assistant", "content": reply},  # a stored reply holding the text
    ]})  # fmt: skip
    open_app(page, server.url)
    scripts = page_elements(page)  # the page's own module script
    page.locator(f'.conversation[data-id="{created["id"]}"] .title').click()
    expect(page.locator(".message.user .body")).to_have_text(f"Say {IMG}")
    expect(page.locator(".message.assistant .body p")).to_have_text(f"Sure: {IMG} and {SCRIPT}")
    expect(page.locator(".message.assistant pre code")).to_have_text(SCRIPT)

    # and typed by the user: sent, stored, shown again after a reload
    set_settings(page, max_tokens="4")
    send(page, f"{SCRIPT} then {IMG}")
    wait_for_reply(page)
    page.reload()
    expect(page.locator(".message.user .body").last).to_have_text(f"{SCRIPT} then {IMG}")
    assert (
        api(server.url, "GET", f"/v1/conversations/{created['id']}")["messages"][2]["content"]
        == f"{SCRIPT} then {IMG}"
    )
    page.wait_for_timeout(300)  # give an injected onerror handler time to fire
    assert page_elements(page) == scripts
    assert page.locator("#messages img, #messages script").count() == 0
    assert watch.dialogs == []


@pytest.mark.parametrize("text", HOSTILE, ids=[f"hostile{i}" for i in range(len(HOSTILE))])
def test_the_renderer_never_makes_markup_from_text(
    page: Page, server: ServerProcess, text: str
) -> None:
    open_app(page, server.url)
    out = render(page, text)
    assert set(out["tags"]) <= ALLOWED_TAGS, out["html"]
    for attribute in out["attributes"]:
        name, _, value = attribute.partition("=")
        assert not name.startswith("on"), out["html"]
        if name == "href":
            assert value.startswith("https://example.com/"), out["html"]
    for piece in (IMG, SCRIPT):
        if piece in text:
            assert piece in out["text"]  # the characters themselves are shown


def test_the_renderer_draws_markdown(page: Page, server: ServerProcess) -> None:
    open_app(page, server.url)
    text = (
        "# Title\n\nSome **bold**, *slanted* and `code`.\nNext line.\n\n"
        "- one\n- two\n  - nested\n\n1. first\n2. second\n\n"
        "> quoted\n\n```python\nprint('<b>')\n```\n\n[docs](https://example.com/x)"
    )
    out = render(page, text)
    html = out["html"]
    assert "<h1>Title</h1>" in html
    assert "<strong>bold</strong>" in html and "<em>slanted</em>" in html
    assert "<code>code</code>.<br>Next line." in html
    assert "<ul><li>one</li><li>two<ul><li>nested</li></ul></li></ul>" in html
    assert "<ol><li>first</li><li>second</li></ol>" in html
    assert "<blockquote><p>quoted</p></blockquote>" in html
    assert "<pre><code>print('&lt;b&gt;')</code></pre>" in html
    assert '<span class="code-lang">python</span><button class="copy" type="button">' in html
    assert (
        '<a href="https://example.com/x" target="_blank" rel="noopener noreferrer">docs</a>' in html
    )


def test_a_code_block_copies_its_code(page: Page, server: ServerProcess) -> None:
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    created = api(server.url, "POST", "/v1/conversations", json={"messages": [
        {"role": "user", "content": "code?"},
        {"role": "assistant", "content": "```sh\nbitserve serve --port 8081\n```"},
    ]})  # fmt: skip
    open_app(page, server.url, created["id"])
    page.click(".code-block .copy")
    expect(page.locator(".code-block .copy")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == "bitserve serve --port 8081"


def test_reasoning_is_a_collapsed_block_above_the_answer(page: Page, server: ServerProcess) -> None:
    # The demo model never reasons: the reply view is fed chunks of the shape the server
    # streams for a reasoning model (delta.reasoning_content before delta.content).
    open_app(page, server.url)
    page.evaluate("""async () => {
      const { MessageView, StreamingReply } = await import("/static/chat.js");
      const view = new MessageView("assistant");
      document.querySelector("#messages").append(view.element);
      const reply = new StreamingReply(view);
      const delta = (d) => ({ choices: [{ index: 0, delta: d, finish_reason: null }] });
      reply.add(delta({ role: "assistant", content: "" }));
      reply.add(delta({ reasoning_content: "The user greets; " }));
      reply.add(delta({ reasoning_content: "answer <b>kindly</b>." }));
      reply.add(delta({ content: "Hello **there**" }));
      reply.add({ choices: [{ index: 0, delta: {}, finish_reason: "stop" }] });
      reply.add({ choices: [], usage: { prompt_tokens: 9, completion_tokens: 12,
        prompt_tokens_details: { cached_tokens: 4 } } });
      reply.finish("done");
    }""")
    block = page.locator(".message.assistant details.reasoning")
    expect(block).to_have_count(1)
    assert block.get_attribute("open") is None  # collapsed
    expect(block.locator("summary")).to_have_text("Reasoning")
    expect(block.locator(".reasoning-text")).to_be_hidden()
    block.locator("summary").click()
    expect(block.locator(".reasoning-text")).to_have_text("The user greets; answer <b>kindly</b>.")
    order = page.evaluate(
        "[...document.querySelector('.message.assistant').children].map((e) => e.className)"
    )
    assert order == ["role", "reasoning", "body", "stats"]
    expect(page.locator(".message.assistant .body strong")).to_have_text("there")
    expect(page.locator(".message.assistant .stats")).to_contain_text("4 cached prompt tokens")
    expect(page.locator(".message.assistant .stats")).not_to_contain_text("tokens/s")  # in 0 s


def test_a_stored_reply_shows_its_reasoning_and_tool_calls(
    page: Page, server: ServerProcess
) -> None:
    # the message shape GET /v1/conversations/{id} gives replies of reasoning models and
    # tool calls (the demo model makes neither)
    open_app(page, server.url)
    page.evaluate("""async () => {
      const { messageView } = await import("/static/chat.js");
      document.querySelector("#messages").append(messageView({
        role: "assistant", content: "", reasoning_content: "Look it up.",
        tool_calls: [{ id: "call_1", type: "function",
                       function: { name: "get_weather", arguments: '{"city": "<b>Oslo</b>"}' } }],
        completion_tokens: 17, finish_reason: "tool_calls",
      }));
    }""")
    reply = page.locator(".message.assistant")
    expect(reply.locator("details.reasoning .reasoning-text")).to_have_text("Look it up.")
    expect(reply.locator(".tool-calls code")).to_have_text('get_weather({"city": "<b>Oslo</b>"})')
    expect(reply.locator(".stats")).to_have_text("17 tokens")
    assert reply.locator("b").count() == 0


# The best time (ms) of `runs` renderings of `text`, each rendering it `times` over.
TIME_RENDER = """async ([text, times, runs]) => {
  const { renderMarkdown } = await import("/static/markdown.js");
  let best = Infinity;
  for (let run = 0; run < runs; run += 1) {
    const start = performance.now();
    for (let i = 0; i < times; i += 1) renderMarkdown(text);
    best = Math.min(best, performance.now() - start);
    if (best > 2000) break;  // far too slow already: spare the test the other runs
  }
  return best;
}"""

# Openers without closers between spans: each used to send every inline pattern over the
# rest of the text again after every span (a 17 KB reply of these took seconds to draw).
PATHOLOGICAL = {
    "unclosed openers between spans": "`x` *a _b **c ~~d [e ",
    "pointers in C code spans": "`char *p` and ",
    "links that never close between spans": "`x` [a ",
}


@pytest.mark.parametrize("unit", PATHOLOGICAL.values(), ids=PATHOLOGICAL.keys())
def test_the_renderer_takes_time_in_proportion_to_the_text(
    page: Page, server: ServerProcess, unit: str
) -> None:
    open_app(page, server.url)
    small, large = unit * 100, unit * 800
    page.evaluate(TIME_RENDER, [small, 8, 3])  # warm up (the JIT)
    # the linear baseline: the small text 8 times over is as much text as the large one
    baseline = page.evaluate(TIME_RENDER, [small, 8, 5])
    took = page.evaluate(TIME_RENDER, [large, 1, 5])
    assert took < 2.5 * max(baseline, 1.0), (took, baseline)  # ≤ 20x for 8x the text
    assert took < 1000, took  # it was seconds: now a few ms, ample margin for a slow CI


def test_a_long_code_language_is_clipped(page: Page, server: ServerProcess) -> None:
    open_app(page, server.url)
    page.evaluate("""async (text) => {
      const { messageView } = await import("/static/chat.js");
      document.querySelector("#messages").append(messageView({ role: "assistant", content: text }));
    }""", "```" + "language" * 60 + "\nprint(1)\n```")  # fmt: skip
    block = page.locator(".code-block").bounding_box()
    copy = page.locator(".code-block .copy").bounding_box()
    lang = page.locator(".code-block .code-lang")
    assert block is not None and copy is not None
    assert copy["x"] + copy["width"] <= block["x"] + block["width"] + 0.5  # Copy stays in view
    assert lang.evaluate("(e) => e.scrollWidth > e.clientWidth")  # cut (with an ellipsis)
    expect(page.locator(".code-block .copy")).to_be_in_viewport()


# Feeds a reply view three text chunks at once (as one network read may bring them), waits
# `seconds`, then ends it with usage as the server sends it.
TIMED_REPLY = """async (seconds) => {
  const { MessageView, StreamingReply } = await import("/static/chat.js");
  const view = new MessageView("assistant");
  document.querySelector("#messages").append(view.element);
  const reply = new StreamingReply(view);
  for (const word of ["One ", "two ", "three"]) {
    reply.add({ choices: [{ index: 0, delta: { content: word }, finish_reason: null }] });
  }
  await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
  reply.add({ choices: [{ index: 0, delta: {}, finish_reason: "stop" }] });
  reply.add({ choices: [], usage: { prompt_tokens: 9, completion_tokens: 3 } });
  reply.finish("done");
  return view.stats.textContent;
}"""


def test_a_rate_is_shown_only_when_it_can_be_measured(page: Page, server: ServerProcess) -> None:
    open_app(page, server.url)
    # tokens that came within a few ms: no rate (it would read hundreds of tokens/s)
    assert page.evaluate(TIMED_REPLY, 0.03).startswith("3 tokens · first token ")
    # over half a second: two tokens after the first in 0.5 s (or a little more)
    stats = page.evaluate(TIMED_REPLY, 0.5)
    assert re.match(r"^3 tokens · [0-4]\.\d tokens/s · first token \d+ ms$", stats), stats
