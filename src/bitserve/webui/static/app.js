// The chat page: a sidebar of the server's conversations, the selected one's history, and
// a message box whose replies stream in. Everything goes through the public HTTP API
// (api.js); the conversations live on the server, so any client's chats show up here.
// The selected conversation is the page's #hash, so a reload keeps it.

import { Api, ApiError } from "./api.js";
import { MessageView, StreamingReply, messageView } from "./chat.js";
import { el } from "./dom.js";
import { Settings } from "./settings.js";
import { Sidebar, titleFrom } from "./sidebar.js";

const NEW_CHAT_HINT = "A new conversation: it is kept on the server once you send the first message.";

const $ = (id) => document.getElementById(id);
const settings = new Settings();
const api = new Api(() => settings.apiKey);
const sidebar = new Sidebar(api, $("conversations"), $("more"), {
  select,
  deleted: (id) => {
    if (state.current && state.current.id === id) {
      newChat();
    } else if (document.activeElement === document.body) {
      $("new-chat").focus(); // the list is empty now: focus stays in the sidebar
    }
  },
  error: showError,
});
const state = {
  current: null, // the open conversation (with its messages), null for a new chat
  opening: 0, // counts openConversation calls: only the latest one's answer is shown
  loading: null, // while a conversation opens: a promise of whether it opened
  reply: null, // the AbortController of the reply streaming in (or of a send waiting)
  titling: new Set(), // conversations the page titled automatically, or tried to
};

// --- errors: one line above the messages ---------------------------------------------

function showError(err) {
  if (err && err.name === "AbortError") return;
  const sentence = err instanceof ApiError ? err.sentence : `Something went wrong: ${err}`;
  $("error-text").textContent = sentence;
  $("error").hidden = false;
  if (err instanceof ApiError && err.status === 401) openSettings(true);
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

function openSettings(focusKey = false) {
  $("settings").hidden = false;
  $("toggle-settings").setAttribute("aria-expanded", "true");
  if (focusKey) $("api-key").focus();
}

// --- the model ----------------------------------------------------------------------

async function loadModel() {
  const health = await api.call("GET", "health"); // never needs a key
  $("model-name").textContent = health.model;
  document.title = `${health.model} · bitserve`;
  $("demo-badge").hidden = !health.demo;
  const models = await api.call("GET", "v1/models");
  const meta = (models.data.find((model) => model.meta) || {}).meta || {};
  $("model-ctx").textContent = meta.n_ctx ? `${meta.n_ctx} tokens of context` : "";
}

function closeSidebar() {
  document.body.classList.remove("sidebar-open");
  $("toggle-sidebar").setAttribute("aria-expanded", "false");
  $("scrim").hidden = true;
}

// --- the open conversation ---------------------------------------------------------------

function select(id) {
  closeSidebar();
  if (location.hash !== `#${id}`) history.pushState(null, "", `#${id}`); // no hashchange
  openConversation(id); // at once: a message sent from now on waits for it
}

function newChat() {
  stopReply();
  state.opening += 1; // a conversation still loading is not shown
  state.loading = null;
  state.current = null;
  if (location.hash) history.pushState(null, "", location.pathname + location.search);
  $("messages").replaceChildren(el("p", "hint", NEW_CHAT_HINT));
  sidebar.select(null);
  closeSidebar();
  $("input").focus();
}

/** Open conversation `id`; resolves to whether it is now the one shown. */
function openConversation(id) {
  stopReply();
  clearError();
  const loading = loadConversation(id, ++state.opening);
  state.loading = loading;
  loading.finally(() => {
    if (state.loading === loading) state.loading = null;
  });
  return loading;
}

async function loadConversation(id, ticket) {
  let conversation;
  try {
    conversation = await api.call("GET", `v1/conversations/${encodeURIComponent(id)}`);
  } catch (err) {
    if (ticket !== state.opening) return false;
    showError(err);
    // nothing is open now: a message starts a new conversation, never goes to the one before
    state.current = null;
    $("messages").replaceChildren(el("p", "hint", NEW_CHAT_HINT));
    sidebar.select(null);
    return false;
  }
  if (ticket !== state.opening) return false; // another conversation was chosen meanwhile
  state.current = conversation;
  const views = conversation.messages.map(messageView);
  $("messages").replaceChildren(...(views.length ? views : [el("p", "hint", "No messages yet.")]));
  sidebar.select(conversation.id);
  scrollToEnd(true);
  const first = conversation.messages.find((m) => m.role === "user");
  if (first) autoTitle(conversation, first.content); // a chat from elsewhere
  return true;
}

/**
 * Title an untitled conversation from a message, once. Best effort, never awaited: a server
 * that refuses (the conversation's metadata is full, say) leaves it untitled, and the page
 * goes on without a word (a rename by hand shows the server's answer).
 */
function autoTitle(conversation, text) {
  const titled = conversation.metadata && conversation.metadata.title;
  if (titled || state.titling.has(conversation.id)) return;
  state.titling.add(conversation.id);
  sidebar.setTitle(conversation, titleFrom(text)).catch((err) => {
    console.warn(`could not title ${conversation.id}:`, err);
  });
}

function scrollToEnd(force = false) {
  const box = $("messages");
  if (force || box.scrollHeight - box.scrollTop - box.clientHeight < 80) {
    box.scrollTop = box.scrollHeight;
  }
}

function append(view) {
  const box = $("messages");
  box.querySelector(":scope > .hint")?.remove();
  box.append(view.element);
  scrollToEnd(true);
}

// --- sending a message ----------------------------------------------------------------

function setStreaming(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  document.body.classList.toggle("streaming", on);
}

function stopReply() {
  if (state.reply) state.reply.abort();
}

/** A new conversation on the server, in the sidebar; `open` shows it (a new chat's first). */
async function createConversation(text, open) {
  const body = { metadata: { title: titleFrom(text) } };
  if (settings.systemPrompt) body.messages = [{ role: "system", content: settings.systemPrompt }];
  const conversation = await api.call("POST", "v1/conversations", body);
  conversation.messages = body.messages || [];
  sidebar.add(conversation);
  if (!open()) return null; // another conversation was opened meanwhile: it stays in the list
  history.replaceState(null, "", `#${conversation.id}`); // no hashchange: it is open already
  state.current = conversation;
  sidebar.select(conversation.id);
  if (settings.systemPrompt) {
    const view = new MessageView("system");
    view.show(settings.systemPrompt);
    append(view);
  }
  return conversation;
}

async function send() {
  const input = $("input");
  const text = input.value;
  if (!text.trim() || state.reply) return;
  clearError();
  const controller = new AbortController();
  state.reply = controller;
  setStreaming(true);
  const goOn = () => !controller.signal.aborted; // Stop, or another conversation, ends it
  try {
    // A conversation still opening is the one the message is for: it waits for it. If it
    // fails to open (the error says why), or another is chosen, the text stays in the box.
    if (state.loading !== null) {
      const opened = await state.loading;
      if (!opened || !goOn()) return;
    }
    let conversation = state.current;
    if (conversation === null) {
      conversation = await createConversation(text, goOn);
      if (conversation === null) return;
    } else {
      autoTitle(conversation, text);
    }
    input.value = "";
    const question = new MessageView("user");
    question.show(text);
    append(question);
    const view = new MessageView("assistant");
    append(view);
    const outcome = await streamReply(conversation, text, new StreamingReply(view), controller);
    if (outcome === "failed") {
      question.element.classList.add("failed");
      if (!input.value) input.value = text; // to send again
    }
  } catch (err) {
    showError(err);
  } finally {
    state.reply = null;
    setStreaming(false);
  }
}

async function streamReply(conversation, text, reply, controller) {
  const body = {
    messages: [{ role: "user", content: text }],
    stream: true,
    stream_options: { include_usage: true },
    ...settings.sampling(),
  };
  const path = `v1/conversations/${encodeURIComponent(conversation.id)}/chat`;
  let outcome = "failed";
  try {
    for await (const chunk of api.stream(path, body, controller.signal)) {
      reply.add(chunk);
      scrollToEnd();
    }
    outcome = "done";
  } catch (err) {
    if (err && err.name === "AbortError") {
      outcome = "stopped";
    } else {
      showError(err);
    }
  } finally {
    reply.finish(outcome);
    scrollToEnd();
  }
  return outcome;
}

// --- start ------------------------------------------------------------------------------

function route() {
  let id;
  try {
    id = decodeURIComponent(location.hash.slice(1));
  } catch {
    id = ""; // a malformed address (a broken %-escape): a new chat instead
    history.replaceState(null, "", location.pathname + location.search);
  }
  if (id) {
    openConversation(id);
  } else if (state.current !== null || !$("messages").hasChildNodes()) {
    newChat();
  }
}

function start() {
  clearError();
  loadModel().catch(showError);
  sidebar.load().catch(showError);
}

function wire() {
  settings.bind($("settings"), () => {
    start();
    route();
  });
  $("settings").addEventListener("submit", (event) => event.preventDefault());
  $("toggle-settings").addEventListener("click", () => {
    const form = $("settings");
    form.hidden = !form.hidden;
    $("toggle-settings").setAttribute("aria-expanded", String(!form.hidden));
  });
  $("toggle-sidebar").addEventListener("click", () => {
    const open = !document.body.classList.contains("sidebar-open");
    document.body.classList.toggle("sidebar-open", open);
    $("toggle-sidebar").setAttribute("aria-expanded", String(open));
    $("scrim").hidden = !open;
    if (open) $("new-chat").focus(); // closed, nothing in it takes focus (style.css)
  });
  $("scrim").addEventListener("click", closeSidebar);
  $("new-chat").addEventListener("click", newChat);
  $("refresh").addEventListener("click", () => {
    clearError();
    sidebar.load().catch(showError);
  });
  $("error-close").addEventListener("click", clearError);
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    } else if (event.key === "Escape" && state.reply) {
      stopReply();
    }
  });
  $("stop").addEventListener("click", stopReply);
  window.addEventListener("hashchange", route);
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible" && !state.reply) {
      sidebar.load().catch(() => {}); // a chat started elsewhere shows up
    }
  });
}

wire();
start();
route();
