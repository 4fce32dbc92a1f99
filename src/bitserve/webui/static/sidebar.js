// The sidebar: the server's conversations, newest first and paged, each titled by its
// metadata.title, with rename (an update of the metadata) and delete (after asking).

import { ApiError } from "./api.js";
import { el } from "./dom.js";

const PAGE_SIZE = 20;
const TITLE_CHARS = 60;
const MAX_TITLE_CHARS = 512; // the server's limit for a metadata value

function button(className, text, label) {
  const node = el("button", className, text);
  node.type = "button";
  if (label) node.setAttribute("aria-label", label);
  return node;
}

export function titleOf(conversation) {
  return (conversation.metadata && conversation.metadata.title) || "Untitled conversation";
}

/**
 * A title from a message: its first characters on one line. It is cut between code points,
 * never inside a surrogate pair (an emoji): the server refuses a lone surrogate.
 */
export function titleFrom(text) {
  const line = String(text).trim().replace(/\s+/g, " ");
  const chars = Array.from(line);
  return chars.length > TITLE_CHARS ? `${chars.slice(0, TITLE_CHARS - 1).join("")}…` : line;
}

function path(conversation) {
  return `v1/conversations/${encodeURIComponent(conversation.id)}`;
}

export class Sidebar {
  /**
   * `list` is the <ul>, `more` the Load more button; `on.select(id)`, `on.deleted(id)` and
   * `on.error(err)` tell the page what happened.
   */
  constructor(api, list, more, on) {
    this.api = api;
    this.list = list;
    this.more = more;
    this.on = on;
    this.conversations = [];
    this.lastId = null;
    this.selectedId = null;
    more.addEventListener("click", () => this.load(true).catch(on.error));
  }

  /** The first page again, or (`more`) the next one. */
  async load(more = false) {
    const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if (more && this.lastId) query.set("after", this.lastId);
    const page = await this.api.call("GET", `v1/conversations?${query}`);
    this.conversations = more ? [...this.conversations, ...page.data] : page.data;
    this.lastId = page.last_id;
    this.more.hidden = !page.has_more;
    this.render();
  }

  /** Mark `id` (null: none) as the open conversation. */
  select(id) {
    this.selectedId = id;
    this.render();
  }

  /** A conversation just created here goes on top. */
  add(conversation) {
    this.conversations.unshift(conversation);
    this.render();
  }

  /** Set `conversation`'s title on the server, keeping its other metadata. */
  async setTitle(conversation, title) {
    const metadata = { ...(conversation.metadata || {}), title };
    const updated = await this.api.call("POST", path(conversation), { metadata });
    for (const c of [conversation, ...this.conversations]) {
      if (c.id === conversation.id) c.metadata = updated.metadata;
    }
    this.render();
  }

  render() {
    this.list.replaceChildren(...this.conversations.map((c) => this.item(c)));
  }

  /** Focus the button `selector` of `id`'s item (after a render); false if it is not there. */
  focus(id, selector) {
    const item = [...this.list.children].find((node) => node.dataset.id === id);
    const target = item && item.querySelector(selector);
    if (target) target.focus();
    return Boolean(target);
  }

  item(conversation) {
    const item = el("li", "conversation");
    item.dataset.id = conversation.id;
    if (conversation.id === this.selectedId) item.classList.add("selected");
    const open = button("title", titleOf(conversation));
    const created = new Date(conversation.created_at * 1000).toLocaleString();
    open.title = `${conversation.id}, created ${created}`;
    open.addEventListener("click", () => this.on.select(conversation.id));
    const rename = button("rename", "✎", "Rename");
    rename.addEventListener("click", () => this.rename(item, conversation));
    const remove = button("delete", "✕", "Delete");
    remove.addEventListener("click", () => this.confirmDelete(item, conversation));
    item.append(open, rename, remove);
    return item;
  }

  rename(item, conversation) {
    const input = el("input", "rename-input");
    input.value = titleOf(conversation);
    input.setAttribute("aria-label", "New title");
    input.maxLength = MAX_TITLE_CHARS;
    let done = false;
    // `refocus`: finished from the keyboard, so focus goes back to ✎ (after a click
    // elsewhere it stays where it went)
    const finish = async (save, refocus) => {
      if (done) return;
      done = true;
      const title = input.value.trim();
      if (save && title && title !== titleOf(conversation)) {
        try {
          await this.setTitle(conversation, title);
        } catch (err) {
          this.on.error(err);
        }
      }
      this.render();
      if (refocus) this.focus(conversation.id, ".rename");
    };
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") finish(true, true);
      if (event.key === "Escape") finish(false, true);
    });
    input.addEventListener("blur", () => finish(true, false));
    item.replaceChildren(input);
    input.focus();
    input.select();
  }

  confirmDelete(item, conversation) {
    const question = el("span", "confirm-text", `Delete “${titleOf(conversation)}”?`);
    const yes = button("confirm-delete", "Delete");
    const no = button("cancel-delete", "Cancel");
    const cancel = () => {
      this.render();
      this.focus(conversation.id, ".delete");
    };
    yes.addEventListener("click", () => this.delete(conversation));
    no.addEventListener("click", cancel);
    item.addEventListener("keydown", (event) => {
      if (event.key === "Escape") cancel();
    });
    item.classList.add("confirming");
    item.replaceChildren(question, yes, no);
    no.focus();
  }

  async delete(conversation) {
    try {
      await this.api.call("DELETE", path(conversation));
    } catch (err) {
      if (!(err instanceof ApiError && err.code === "conversation_not_found")) {
        this.on.error(err);
        this.render();
        this.focus(conversation.id, ".delete");
        return;
      }
      // already gone (deleted elsewhere): drop it here too
    }
    const index = this.conversations.findIndex((c) => c.id === conversation.id);
    this.conversations = this.conversations.filter((c) => c.id !== conversation.id);
    this.render();
    const next = this.conversations[Math.min(index, this.conversations.length - 1)];
    if (next) this.focus(next.id, ".title"); // the item that took its place
    this.on.deleted(conversation.id);
  }
}
