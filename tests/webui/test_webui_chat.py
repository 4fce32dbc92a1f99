"""The chat page in a real browser against the real server process on the demo model:
a reply streams in with its figures, Stop ends the generation on the server, a reload
keeps the conversation, chats from other clients show up, rename and delete, and a
phone-sized screen."""

from __future__ import annotations

import re
import time

import httpx
from playwright.sync_api import Browser, Page, Route, expect
from webui_helpers import (
    PHONE,
    STATS,
    PageWatch,
    api,
    metric,
    open_app,
    send,
    set_settings,
    wait_for_reply,
)

from bitserve.api.process import ServerProcess

# Records the length of the reply's text at every change the page makes to it.
WATCH_REPLY = """() => {
  window.replyLengths = [];
  new MutationObserver(() => {
    const body = document.querySelector(".message.assistant:last-of-type .body");
    if (body) window.replyLengths.push(body.textContent.length);
  }).observe(document.querySelector("#messages"),
             {childList: true, subtree: true, characterData: true});
}"""


def selected_id(page: Page) -> str:
    expect(page.locator(".conversation.selected")).to_have_count(1)
    return str(page.locator(".conversation.selected").get_attribute("data-id"))


def test_the_page_prints_its_address_and_names_the_demo_model(
    page: Page, server: ServerProcess
) -> None:
    assert f"open {server.url}/ in a browser" in server.log()
    open_app(page, server.url)
    expect(page).to_have_title("demo-v1 · bitserve")
    expect(page.locator("#demo-badge")).to_be_visible()
    expect(page.locator("#model-ctx")).to_have_text("2048 tokens of context")


def test_a_reply_streams_in_and_is_kept_on_the_server(page: Page, server: ServerProcess) -> None:
    open_app(page, server.url)
    set_settings(
        page, temperature="0", max_tokens="240", top_p="0.9", top_k="20", system_prompt="Be brief."
    )  # ~1 s of reply (~250 tokens/s here): long enough to see it stream
    page.evaluate(WATCH_REPLY)
    with page.expect_request(re.compile(r"/chat$")) as request:
        send(page, "Hello")
    assert request.value.post_data_json == {
        "messages": [{"role": "user", "content": "Hello"}],  # only the new message
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "max_tokens": 240,
        "top_p": 0.9,
        "top_k": 20,
    }
    stats = wait_for_reply(page)
    first = STATS.match(stats)
    assert first is not None and " tokens/s · " in stats  # long enough to measure its rate
    lengths = page.evaluate("window.replyLengths")
    growing = sorted({n for n in lengths if n > 0})
    assert len(growing) >= 3, f"the reply did not stream in: {lengths}"  # drawn piece by piece
    assert lengths == sorted(lengths)  # only ever grew

    conversation = api(server.url, "GET", f"/v1/conversations/{selected_id(page)}")
    assert conversation["metadata"] == {"title": "Hello"}
    roles = [m["role"] for m in conversation["messages"]]
    assert roles == ["system", "user", "assistant"]
    reply = conversation["messages"][2]
    assert int(first.group(1)) == reply["completion_tokens"]
    expect(page.locator(".message.system .body")).to_have_text("Be brief.")
    expect(page.locator(".conversation.selected .title")).to_have_text("Hello")

    send(page, "And then?")  # the next turn starts with the whole history: a cache hit
    second = STATS.match(wait_for_reply(page))
    assert second is not None and int(second.group(2)) > 0


def test_stop_ends_the_generation_on_the_server(page: Page, server: ServerProcess) -> None:
    url = server.url
    open_app(page, url)
    set_settings(page, temperature="0", max_tokens="1500")
    cancelled = metric(url, "bitserve_requests_cancelled_total")
    generated = metric(url, "bitserve_tokens_generated_total")
    send(page, "Hello")
    reply = page.locator(".message.assistant .body")
    expect(reply).to_have_text(re.compile(r"[\s\S]{20}"))  # well under way
    page.click("#stop")
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator(".message.assistant .stats")).to_contain_text("Stopped after")

    deadline = time.monotonic() + 10
    while metric(url, "bitserve_requests_cancelled_total") < cancelled + 1:
        assert time.monotonic() < deadline, "the server never cancelled the generation"
        time.sleep(0.05)
    counted = metric(url, "bitserve_tokens_generated_total")
    time.sleep(1.0)  # ~100 more tokens, were it still generating
    assert metric(url, "bitserve_tokens_generated_total") == counted
    assert metric(url, "bitserve_running_sequences") == 0
    assert counted - generated < 1500  # stopped before max_tokens
    conversation = api(url, "GET", f"/v1/conversations/{selected_id(page)}")
    kept = [(m["role"], m["content"], m["finish_reason"]) for m in conversation["messages"]]
    assert kept == [("user", "Hello", None), ("assistant", "", "interrupted")]

    send(page, "Hi again")  # the page goes on working after a stop; Esc stops too
    expect(page.locator(".message.assistant").last.locator(".body")).not_to_be_empty()
    page.press("#input", "Escape")
    expect(page.locator(".message.assistant.stopped")).to_have_count(2)
    deadline = time.monotonic() + 10
    while metric(url, "bitserve_requests_cancelled_total") < cancelled + 2:
        assert time.monotonic() < deadline, "Esc did not cancel the generation"
        time.sleep(0.05)


def test_a_reload_shows_the_conversation_with_its_history(
    page: Page, server: ServerProcess
) -> None:
    open_app(page, server.url)
    set_settings(page, max_tokens="12")
    page.fill("#input", "Remember")
    page.press("#input", "Shift+Enter")  # a new line, not a send
    page.type("#input", "this line")
    expect(page.locator(".message")).to_have_count(0)
    page.press("#input", "Enter")
    stats = wait_for_reply(page)
    reply_text = page.locator(".message.assistant .body").inner_text()
    conversation_id = selected_id(page)
    assert page.url.endswith(f"#{conversation_id}")

    stored = api(server.url, "GET", f"/v1/conversations/{conversation_id}")
    assert stored["messages"][0]["content"] == "Remember\nthis line"

    page.reload()
    expect(page.locator(".conversation.selected .title")).to_have_text("Remember this line")
    expect(page.locator(".message.user .body")).to_have_text("Remember\nthis line")
    expect(page.locator(".message.assistant .body")).to_have_text(reply_text)
    tokens = stats.split(" ")[0]  # a stored reply shows its token count
    expect(page.locator(".message.assistant .stats")).to_have_text(
        re.compile(rf"^{tokens} tokens\b")
    )

    page.goto(f"{server.url}/")  # no conversation chosen: pick it in the sidebar
    expect(page.locator(".message")).to_have_count(0)
    page.locator(f'.conversation[data-id="{conversation_id}"] .title').click()
    expect(page.locator(".message.assistant .body")).to_have_text(reply_text)


def test_a_conversation_from_another_client_appears(page: Page, server: ServerProcess) -> None:
    url = server.url
    open_app(page, url)
    created = api(url, "POST", "/v1/conversations")  # untitled, like curl's
    chat = {"messages": [{"role": "user", "content": "Sent by a script"}], "max_tokens": 6}
    answer = api(url, "POST", f"/v1/conversations/{created['id']}/chat", json=chat)
    page.click("#refresh")
    item = page.locator(f'.conversation[data-id="{created["id"]}"]')
    expect(item.locator(".title")).to_have_text("Untitled conversation")
    item.locator(".title").click()
    expect(page.locator(".message.user .body")).to_have_text("Sent by a script")
    tokens = answer["usage"]["completion_tokens"]
    expect(page.locator(".message.assistant .stats")).to_have_text(
        re.compile(rf"^{tokens} tokens\b")
    )
    # the page titles an untitled conversation from its first message, on the server
    expect(item.locator(".title")).to_have_text("Sent by a script")
    assert api(url, "GET", f"/v1/conversations/{created['id']}")["metadata"] == {
        "title": "Sent by a script"
    }


def test_the_sidebar_pages_through_many_conversations(page: Page, server: ServerProcess) -> None:
    ids = [
        api(server.url, "POST", "/v1/conversations", json={"metadata": {"title": f"Page {i}"}})[
            "id"
        ]
        for i in range(21)
    ]
    open_app(page, server.url)
    items = page.locator(".conversation")
    expect(items).to_have_count(20)  # one page, newest first
    assert items.first.get_attribute("data-id") == ids[-1]
    expect(page.locator(f'.conversation[data-id="{ids[0]}"]')).to_have_count(0)
    page.click("#more")
    expect(page.locator(f'.conversation[data-id="{ids[0]}"] .title')).to_have_text("Page 0")
    shown = [items.nth(i).get_attribute("data-id") for i in range(items.count())]
    assert len(shown) == len(set(shown)) > 20


def test_rename_and_delete(page: Page, server: ServerProcess) -> None:
    url = server.url
    created = api(url, "POST", "/v1/conversations", json={"metadata": {"title": "Old", "k": "v"}})
    open_app(page, url, created["id"])
    item = page.locator(f'.conversation[data-id="{created["id"]}"]')
    item.locator(".rename").click()
    page.fill(".rename-input", "New name")
    page.press(".rename-input", "Enter")
    expect(item.locator(".title")).to_have_text("New name")
    stored = api(url, "GET", f"/v1/conversations/{created['id']}")["metadata"]
    assert stored == {"title": "New name", "k": "v"}

    item.locator(".delete").click()
    item.locator(".cancel-delete").click()  # changed their mind
    expect(item.locator(".title")).to_have_text("New name")
    item.locator(".delete").click()
    expect(item).to_contain_text("Delete “New name”?")
    item.locator(".confirm-delete").click()
    expect(item).to_have_count(0)
    expect(page.locator("#messages .hint")).to_be_visible()  # it was open: a new chat now
    assert httpx.get(f"{url}/v1/conversations/{created['id']}", timeout=10).status_code == 404
    page.goto(f"{url}/#{created['id']}")  # an old link to it
    expect(page.locator("#error-text")).to_have_text(
        "This conversation is no longer on the server (deleted, or another key's)."
    )
    expect(page.locator("#messages .hint")).to_be_visible()


def test_a_phone_sized_screen(browser: Browser, server: ServerProcess) -> None:
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    watch = PageWatch(context.new_page())
    page = watch.page
    try:
        created = api(url := server.url, "POST", "/v1/conversations",
                      json={"metadata": {"title": "On the phone"}})  # fmt: skip
        open_app(page, url)
        sidebar = page.locator("#sidebar")
        expect(sidebar).not_to_be_in_viewport()  # slid away: the chat has the width
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        expect(page.locator("#input")).to_be_in_viewport()
        page.click("#toggle-sidebar")
        expect(sidebar).to_be_in_viewport()
        page.locator(f'.conversation[data-id="{created["id"]}"] .title').click()
        expect(sidebar).not_to_be_in_viewport()
        set_settings(page, max_tokens="8", temperature="0")
        page.click("#toggle-settings")
        send(page, "Small screen")
        assert STATS.match(wait_for_reply(page))
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    finally:
        context.close()
    assert watch.errors == []


def test_dark_mode_follows_the_system(browser: Browser, server: ServerProcess) -> None:
    def background(scheme: str) -> list[int]:
        context = browser.new_context(color_scheme=scheme)  # type: ignore[arg-type]
        page = context.new_page()
        page.goto(f"{server.url}/")
        rgb = page.evaluate("getComputedStyle(document.body).backgroundColor")
        context.close()
        return [int(v) for v in rgb[rgb.index("(") + 1 : -1].split(",")[:3]]

    assert sum(background("light")) > 600
    assert sum(background("dark")) < 150


def test_a_title_is_cut_between_characters(page: Page, server: ServerProcess) -> None:
    # cut after 59 UTF-16 units, this title would end in half an emoji (a lone surrogate),
    # which the server refuses: the first message could never be sent
    open_app(page, server.url)
    set_settings(page, max_tokens="4")
    text = "a" * 58 + "😀 and more words, to make the message longer than a title"
    send(page, text)
    expect(page.locator(".message.assistant")).to_have_count(1)
    wait_for_reply(page)
    expect(page.locator("#error")).to_be_hidden()
    conversation = api(server.url, "GET", f"/v1/conversations/{selected_id(page)}")
    assert conversation["metadata"] == {"title": "a" * 58 + "😀…"}
    assert conversation["messages"][0]["content"] == text


def hold_history(page: Page, conversation_id: str) -> list[Route]:
    """Hold back the page's requests for a conversation's history (``GET`` of it): the
    returned list fills with them, to be let through (``continue_``) or failed."""
    held: list[Route] = []
    page.route(re.compile(rf".*/v1/conversations/{conversation_id}$"), lambda r: held.append(r))
    return held


def wait_for_held(page: Page, held: list[Route]) -> Route:
    deadline = time.monotonic() + 10
    while not held:
        assert time.monotonic() < deadline, "the page never asked for the conversation"
        page.wait_for_timeout(20)
    return held.pop()


def stored_contents(url: str, conversation_id: str) -> list[str]:
    messages = api(url, "GET", f"/v1/conversations/{conversation_id}")["messages"]
    return [m["content"] for m in messages]


def test_a_message_sent_while_a_conversation_opens_goes_to_that_one(
    page: Page, server: ServerProcess
) -> None:
    url = server.url

    def made(title: str) -> str:
        messages = [{"role": "user", "content": f"In {title}"},
                    {"role": "assistant", "content": f"Reply in {title}"}]  # fmt: skip
        created = api(url, "POST", "/v1/conversations",
                      json={"metadata": {"title": title}, "messages": messages})  # fmt: skip
        return str(created["id"])

    shown, opening, broken = made("Shown"), made("Opening"), made("Broken")
    open_app(page, url, shown)
    expect(page.locator(".message.user .body")).to_have_text("In Shown")
    set_settings(page, max_tokens="4")
    held = hold_history(page, opening)
    page.locator(f'.conversation[data-id="{opening}"] .title').click()
    request = wait_for_held(page, held)
    send(page, "Which one?")  # the history of "Opening" has not come yet
    page.wait_for_timeout(300)
    request.continue_()
    wait_for_reply(page)
    expect(page.locator(".message.user .body")).to_have_text(["In Opening", "Which one?"])
    assert stored_contents(url, shown) == ["In Shown", "Reply in Shown"]
    assert stored_contents(url, opening)[:3] == ["In Opening", "Reply in Opening", "Which one?"]

    # one that fails to open takes nothing: the message stays in the box
    held = hold_history(page, broken)
    page.locator(f'.conversation[data-id="{broken}"] .title').click()
    request = wait_for_held(page, held)
    send(page, "Lost?")
    page.wait_for_timeout(300)
    request.abort()
    expect(page.locator("#error-text")).to_have_text(re.compile("^Cannot reach"))
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#input")).to_have_value("Lost?")
    assert len(stored_contents(url, opening)) == 4
    assert stored_contents(url, broken) == ["In Broken", "Reply in Broken"]

    # from a fresh load at a conversation's address, before its history came
    page.goto("about:blank")
    held = hold_history(page, shown)
    open_app(page, url, shown)
    request = wait_for_held(page, held)
    send(page, "After a reload")
    page.wait_for_timeout(300)
    request.continue_()
    wait_for_reply(page)
    assert page.url.endswith(f"#{shown}")
    assert stored_contents(url, shown)[2] == "After a reload"
    titles = api(url, "GET", "/v1/conversations?limit=5")["data"]
    assert [c["id"] for c in titles][:3] == [broken, opening, shown]  # no new conversation


def test_an_untitled_conversation_with_full_metadata(page: Page, server: ServerProcess) -> None:
    # 16 pairs is the server's maximum: the page's automatic title would be a 17th
    url = server.url
    metadata = {f"key{i}": "value" for i in range(16)}
    created = api(url, "POST", "/v1/conversations", json={"metadata": metadata, "messages": [
        {"role": "user", "content": "From a script"},
        {"role": "assistant", "content": "Fine"},
    ]})  # fmt: skip
    open_app(page, url, created["id"])
    expect(page.locator(".message.user .body")).to_have_text("From a script")
    set_settings(page, max_tokens="4")
    send(page, "And from the page")
    expect(page.locator(".message.assistant")).to_have_count(2)
    wait_for_reply(page)
    expect(page.locator("#error")).to_be_hidden()  # titling it was best effort, silently
    stored = api(url, "GET", f"/v1/conversations/{created['id']}")
    assert stored["metadata"] == metadata
    assert stored["messages"][2]["content"] == "And from the page"

    # a rename by hand says the server refused it, and the page goes on working
    item = page.locator(f'.conversation[data-id="{created["id"]}"]')
    item.locator(".rename").click()
    page.fill(".rename-input", "Mine")
    page.press(".rename-input", "Enter")
    expect(page.locator("#error-text")).to_have_text(
        re.compile(r"^The server refused the request \(400\)")
    )
    expect(item.locator(".title")).to_have_text("Untitled conversation")
    send(page, "Still here")
    expect(page.locator(".message.assistant")).to_have_count(3)
    wait_for_reply(page)
    expect(page.locator("#error")).to_be_hidden()
    assert stored_contents(url, created["id"])[4] == "Still here"


def test_a_malformed_address_opens_a_new_chat(page: Page, server: ServerProcess) -> None:
    url = server.url
    page.goto(f"{url}/#%E0%A4%A")  # a broken %-escape: decodeURIComponent throws
    expect(page.locator("#model-name")).to_have_text("demo-v1")
    expect(page.locator("#messages .hint")).to_be_visible()
    assert page.url == f"{url}/"
    set_settings(page, max_tokens="4")
    send(page, "Still works")
    wait_for_reply(page)
    conversation_id = selected_id(page)
    page.evaluate("location.hash = '%E0%A4%A'")  # typed while a conversation is open
    expect(page.locator("#messages .hint")).to_be_visible()
    expect(page.locator(".conversation.selected")).to_have_count(0)
    assert page.url == f"{url}/"
    assert stored_contents(url, conversation_id)[0] == "Still works"
    # the watch fixture fails the test if the page threw (an uncaught URIError)
