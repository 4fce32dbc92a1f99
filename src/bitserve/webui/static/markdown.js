// A small Markdown renderer for chat replies that builds DOM nodes directly.
//
// Model output and user text are untrusted: nothing here ever parses text as HTML
// (no innerHTML, no insertAdjacentHTML). Every piece of text becomes a Text node or an
// element's textContent, so `<script>` or `<img onerror=...>` in a reply shows as those
// characters. Links keep only http(s) and mailto targets.
//
// Blocks: paragraphs (a single newline is a line break), ATX headings, fenced code blocks
// (with a copy button; an unclosed fence runs to the end, as while a reply streams),
// bullet and numbered lists (nested by indentation), block quotes, horizontal rules.
// Inline: `code`, **strong**, *emphasis*, ~~strike~~, [links](https://...).

import { el } from "./dom.js";

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:\s+(.*?))?\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const ITEM = /^( *)([-*+]|\d{1,9}[.)])[ \t]+(.*)$/;
const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);

/** Render `text` as Markdown into a new DocumentFragment. */
export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  renderBlocks(String(text).replace(/\r\n?/g, "\n").split("\n"), fragment, 0);
  return fragment;
}

function isBlockStart(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line)
    || ITEM.test(line);
}

// Quotes and lists nest at most this deep; deeper lines are drawn as plain text (a reply
// of a thousand "> " would otherwise recurse a thousand times, on every streamed frame).
const MAX_DEPTH = 16;

function renderBlocks(lines, parent, depth) {
  if (depth > MAX_DEPTH) {
    const p = el("p");
    appendText(lines.join("\n"), p);
    parent.append(p);
    return;
  }
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) {
      i += 1;
    } else if (FENCE.test(line)) {
      i = codeBlock(lines, i, parent);
    } else if (HEADING.test(line)) {
      const [, hashes, title] = HEADING.exec(line);
      const heading = el(`h${hashes.length}`);
      renderInline(title || "", heading);
      parent.append(heading);
      i += 1;
    } else if (RULE.test(line)) {
      parent.append(el("hr"));
      i += 1;
    } else if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && QUOTE.test(lines[i])) inner.push(QUOTE.exec(lines[i++])[1]);
      const quote = el("blockquote");
      renderBlocks(inner, quote, depth + 1);
      parent.append(quote);
    } else if (ITEM.test(line)) {
      i = list(lines, i, parent, depth);
    } else {
      const paragraph = [];
      while (i < lines.length && lines[i].trim() && !(paragraph.length && isBlockStart(lines[i]))) {
        paragraph.push(lines[i++].trim());
      }
      const p = el("p");
      renderInline(paragraph.join("\n"), p);
      parent.append(p);
    }
  }
}

function codeBlock(lines, start, parent) {
  const [, fence, lang] = FENCE.exec(lines[start]);
  const closing = new RegExp(`^ {0,3}${fence[0] === "`" ? "`" : "~"}{${fence.length},}\\s*$`);
  const body = [];
  let i = start + 1;
  while (i < lines.length && !closing.test(lines[i])) body.push(lines[i++]);
  const code = body.join("\n");
  const block = el("div", "code-block");
  const head = el("div", "code-head");
  head.append(el("span", "code-lang", lang), copyButton(code));
  const pre = el("pre");
  pre.append(el("code", "", code));
  block.append(head, pre);
  parent.append(block);
  return i + 1; // past the closing fence (or the end)
}

function copyButton(code) {
  const button = el("button", "copy", "Copy");
  button.type = "button";
  button.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(code);
      button.textContent = "Copied";
    } catch {
      button.textContent = "Copy failed";
    }
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });
  return button;
}

// One list: consecutive items of the same kind (bullets or numbers) at one indentation.
// An item's own lines are its first line plus the lines indented past its marker (and
// blank lines between them), rendered as blocks, so items can hold code and sub-lists.
function list(lines, start, parent, depth) {
  const [, indent, marker] = ITEM.exec(lines[start]);
  const ordered = /\d/.test(marker);
  const node = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(marker, 10) !== 1) node.start = parseInt(marker, 10);
  const sameList = (line) => {
    const match = ITEM.exec(line || "");
    return match && match[1].length === indent.length && /\d/.test(match[2]) === ordered;
  };
  let i = start;
  let loose = false;
  while (i < lines.length && sameList(lines[i])) {
    const match = ITEM.exec(lines[i]);
    const contentIndent = match[1].length + match[2].length + 1;
    const body = [match[3]];
    i += 1;
    while (i < lines.length) {
      const line = lines[i];
      const indentation = line.length - line.trimStart().length;
      if (line.trim() && indentation >= Math.min(contentIndent, indent.length + 2)) {
        body.push(line.slice(Math.min(indentation, contentIndent)));
      } else if (!line.trim() && i + 1 < lines.length && lines[i + 1].trim()
                 && lines[i + 1].length - lines[i + 1].trimStart().length >= contentIndent) {
        body.push("");
      } else {
        break;
      }
      i += 1;
    }
    const item = el("li");
    renderBlocks(body, item, depth + 1);
    node.append(item);
    if (i < lines.length && !lines[i].trim() && sameList(lines[i + 1])) {
      loose = true;
      i += 1; // a blank line between items: the list goes on
    }
  }
  if (!loose) {
    // a tight list's items hold their text directly, not in paragraphs
    for (const p of node.querySelectorAll(":scope > li > p")) p.replaceWith(...p.childNodes);
  }
  parent.append(node);
  return i;
}

// Inline spans, earliest match first. Each pattern's group 1 is the inner text.
const INLINE = [
  { re: /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/, make: (m) => el("code", "", m[2]) },
  { re: /\[([^\]\n]+)\]\(\s*<?([^\s<>()]+)>?\s*\)/, make: link },
  { re: /\*\*(?=\S)([\s\S]*?\S)\*\*/, tag: "strong" },
  { re: /__(?=\S)([\s\S]*?\S)__(?!\w)/, tag: "strong" },
  { re: /~~(?=\S)([\s\S]*?\S)~~/, tag: "del" },
  { re: /\*(?=[^\s*])([\s\S]*?[^\s*])\*/, tag: "em" },
  { re: /(?<![\w])_(?=[^\s_])([\s\S]*?[^\s_])_(?![\w])/, tag: "em" },
];

function renderInline(text, parent) {
  while (text) {
    let best = null;
    for (const rule of INLINE) {
      const m = rule.re.exec(text);
      if (m && (best === null || m.index < best.m.index)) best = { rule, m };
    }
    if (best === null) {
      appendText(text, parent);
      return;
    }
    const { rule, m } = best;
    appendText(text.slice(0, m.index), parent);
    if (rule.make) {
      parent.append(rule.make(m));
    } else {
      const span = el(rule.tag);
      renderInline(m[1], span);
      parent.append(span);
    }
    text = text.slice(m.index + m[0].length);
  }
}

// Text with its newlines as line breaks.
function appendText(text, parent) {
  text.split("\n").forEach((part, index) => {
    if (index > 0) parent.append(el("br"));
    if (part) parent.append(document.createTextNode(part));
  });
}

function link(m) {
  let url = null;
  try {
    url = new URL(m[2]);
  } catch {
    url = null;
  }
  if (url === null || !SAFE_PROTOCOLS.has(url.protocol)) {
    return document.createTextNode(m[0]); // not a link we open: the characters as written
  }
  const a = el("a");
  a.href = url.href;
  a.target = "_blank";
  a.rel = "noopener noreferrer";
  renderInline(m[1], a);
  return a;
}
