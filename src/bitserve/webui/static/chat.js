// How messages look: user and system text exactly as written, replies as Markdown (built
// as DOM nodes, never parsed as HTML), reasoning in a collapsed block above the answer, and
// a line of figures under each reply.

import { renderMarkdown } from "./markdown.js";
import { el } from "./dom.js";

const ROLE_LABELS = { user: "You", assistant: "Model", system: "System prompt", tool: "Tool result" };
// A rate needs tokens that came over some time: several can arrive in one network read,
// and their rate over a few microseconds would say "25000 tokens/s".
const MIN_RATE_TOKENS = 2;
const MIN_RATE_SECONDS = 0.2;

export class MessageView {
  constructor(role) {
    this.role = role;
    this.element = el("article", `message ${role}`);
    this.element.append(el("div", "role", ROLE_LABELS[role] || role));
    this.reasoning = null; // the <details> block, made when there is reasoning
    this.body = el("div", "body");
    this.stats = el("div", "stats");
    this.element.append(this.body, this.stats);
  }

  /** Show `content` (and `reasoning`, when there is some). */
  show(content, reasoning = "") {
    if (reasoning) {
      if (this.reasoning === null) {
        this.reasoning = el("details", "reasoning");
        this.reasoning.append(el("summary", "", "Reasoning"), el("div", "reasoning-text"));
        this.body.before(this.reasoning);
      }
      this.reasoning.lastChild.textContent = reasoning;
    }
    if (this.role !== "assistant") {
      this.body.textContent = content;
      return;
    }
    try {
      this.body.replaceChildren(renderMarkdown(content));
    } catch (err) {
      this.body.textContent = content; // a renderer bug must not hide the reply
      console.error("markdown rendering failed", err);
    }
  }

  setStats(text) {
    this.stats.textContent = text;
  }

  /** Tool calls of a stored reply (OpenAI's shape), each as `name(arguments)`. */
  showToolCalls(calls) {
    const list = el("div", "tool-calls");
    for (const call of calls) {
      const fn = call.function || {};
      list.append(el("code", "", `${fn.name || "?"}(${fn.arguments || ""})`));
    }
    this.body.append(list);
  }
}

/** A stored message of a conversation's history. */
export function messageView(message) {
  const view = new MessageView(message.role);
  view.show(textOf(message.content), message.reasoning_content || "");
  if (Array.isArray(message.tool_calls) && message.tool_calls.length) {
    view.showToolCalls(message.tool_calls);
  }
  if (message.role === "assistant" && message.completion_tokens != null) {
    view.setStats(statsText({
      tokens: message.completion_tokens,
      finishReason: message.finish_reason,
    }));
  }
  return view.element;
}

function textOf(content) {
  if (typeof content === "string") return content;
  if (Array.isArray(content)) return content.map((part) => part.text || "").join("");
  return "";
}

/**
 * One line of figures under a reply: tokens, tokens/s, time to first token and cached
 * prompt tokens, each when known.
 */
export function statsText({ tokens, tokensPerSecond, ttftMs, cachedTokens, finishReason }) {
  const parts = [`${tokens} token${tokens === 1 ? "" : "s"}`];
  if (tokensPerSecond != null) parts.push(`${tokensPerSecond.toFixed(1)} tokens/s`);
  if (ttftMs != null) parts.push(`first token ${Math.round(ttftMs)} ms`);
  if (cachedTokens != null) parts.push(`${cachedTokens} cached prompt tokens`);
  if (finishReason === "length") parts.push("cut at max tokens");
  if (finishReason === "interrupted") parts.push("interrupted: the reply never completed");
  return parts.join(" · ");
}

/**
 * A reply as it streams in: text is added chunk by chunk and drawn at most once a frame
 * (the whole reply is re-rendered, so Markdown that completes later, such as a closing
 * code fence, is drawn right).
 */
export class StreamingReply {
  constructor(view) {
    this.view = view;
    this.content = "";
    this.reasoning = "";
    this.chunks = 0; // chunks carrying text: about one per generated token
    this.started = performance.now();
    this.firstText = null;
    this.usage = null;
    this.finishReason = null;
    this.pending = false;
    view.element.classList.add("streaming");
  }

  add(chunk) {
    if (chunk.usage) this.usage = chunk.usage;
    for (const choice of chunk.choices || []) {
      const delta = choice.delta || {};
      const text = (delta.content || "") + (delta.reasoning_content || "");
      if (text) {
        this.chunks += 1;
        if (this.firstText === null) this.firstText = performance.now();
      }
      this.content += delta.content || "";
      this.reasoning += delta.reasoning_content || "";
      if (choice.finish_reason) this.finishReason = choice.finish_reason;
    }
    if (!this.pending) {
      this.pending = true;
      requestAnimationFrame(() => this.draw());
    }
  }

  draw() {
    this.pending = false;
    this.view.show(this.content, this.reasoning);
  }

  /** The reply is complete (`outcome` "done"), stopped ("stopped") or failed ("failed"). */
  finish(outcome) {
    const end = performance.now();
    this.draw();
    this.view.element.classList.remove("streaming");
    const ttftMs = this.firstText === null ? null : this.firstText - this.started;
    if (outcome === "done" && this.usage) {
      const tokens = this.usage.completion_tokens;
      const seconds = this.firstText === null ? 0 : (end - this.firstText) / 1000;
      const details = this.usage.prompt_tokens_details || {};
      this.view.setStats(statsText({
        tokens,
        tokensPerSecond: tokens >= MIN_RATE_TOKENS && seconds >= MIN_RATE_SECONDS
          ? (tokens - 1) / seconds
          : null,
        ttftMs,
        cachedTokens: details.cached_tokens ?? null,
        finishReason: this.finishReason,
      }));
    } else if (outcome === "done") {
      this.view.setStats(`~${this.chunks} tokens`); // a server that sent no usage
    } else if (outcome === "stopped") {
      this.view.element.classList.add("stopped");
      this.view.setStats(`Stopped after ~${this.chunks} tokens: the server keeps your message, the reply marked interrupted.`);
    } else if (outcome === "failed") {
      this.view.element.classList.add("failed");
      this.view.setStats("No reply.");
    }
  }
}
