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

// Inline spans: `code`, [links](url), **strong**, __strong__, ~~strike~~, *em*, _em_. The
// earliest span wins (on a tie, the first kind in INLINE); a span's text is rendered again
// for the spans inside it. The rules are those of these regular expressions, run on the
// text after the last span:
//
//   code    (`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)
//   link    \[([^\]\n]+)\]\(\s*<?([^\s<>()]+)>?\s*\)
//   strong  \*\*(?=\S)([\s\S]*?\S)\*\*        __(?=\S)([\s\S]*?\S)__(?!\w)
//   del     ~~(?=\S)([\s\S]*?\S)~~
//   em      \*(?=[^\s*])([\s\S]*?[^\s*])\*    (?<![\w])_(?=[^\s_])([\s\S]*?[^\s_])_(?![\w])
//
// but found in one left-to-right pass per kind instead: each kind remembers its next span
// (or that it has none), and closers are looked up in tables built once per text. Running
// the expressions themselves after every span made a long reply quadratic or worse (an
// opener without a closer scans to the end, again for every span before it), and a
// streaming reply is drawn again every frame.

const SPACE = /\s/;
const WORD = /\w/;
const NONE = { start: Infinity }; // a kind with no span left in the text

const isSpace = (c) => c !== "" && SPACE.test(c);
const isWord = (c) => c !== "" && WORD.test(c);
const nonSpace = (c) => c !== "" && !SPACE.test(c);

/**
 * Emphasis-like spans: `open` opens, the first `close` after at least one character of
 * text closes. `opens(text, i, from)` and `closes(text, e)` check the characters around
 * (`from` is where the text after the last span starts: a look-behind stops there).
 */
const DELIMITED = [
  {
    open: "**", tag: "strong",
    opens: (t, i) => nonSpace(t.charAt(i + 2)),
    closes: (t, e) => nonSpace(t.charAt(e - 1)),
  },
  {
    open: "__", tag: "strong",
    opens: (t, i) => nonSpace(t.charAt(i + 2)),
    closes: (t, e) => nonSpace(t.charAt(e - 1)) && !isWord(t.charAt(e + 2)),
  },
  {
    open: "~~", tag: "del",
    opens: (t, i) => nonSpace(t.charAt(i + 2)),
    closes: (t, e) => nonSpace(t.charAt(e - 1)),
  },
  {
    open: "*", tag: "em",
    opens: (t, i) => nonSpace(t.charAt(i + 1)) && t.charAt(i + 1) !== "*",
    closes: (t, e) => nonSpace(t.charAt(e - 1)) && t.charAt(e - 1) !== "*",
  },
  {
    open: "_", tag: "em", lookBehind: true,
    opens: (t, i, from) => (i === from || !isWord(t.charAt(i - 1)))
      && nonSpace(t.charAt(i + 1)) && t.charAt(i + 1) !== "_",
    closes: (t, e) => nonSpace(t.charAt(e - 1)) && t.charAt(e - 1) !== "_"
      && !isWord(t.charAt(e + 1)),
  },
];

function renderInline(text, parent) {
  const kinds = [codeSpans(text), linkSpans(text), ...DELIMITED.map((d) => delimited(text, d))];
  let from = 0;
  for (;;) {
    let best = NONE;
    for (const next of kinds) {
      const span = next(from);
      if (span.start < best.start) best = span; // strictly earlier: ties keep the first kind
    }
    if (best === NONE) break;
    appendText(text.slice(from, best.start), parent);
    parent.append(best.make());
    from = best.end;
  }
  appendText(text.slice(from), parent);
}

/**
 * The spans of one kind in `text`, as a function of `from` (which never decreases) giving
 * the first span starting at `from` or later: `scan(from)` searches from `from`, and its
 * answer holds until a span of another kind passes it. `atStart(from)`, for a kind with a
 * look-behind, is a span that opens at `from` only because the text starts anew there.
 */
function spans(scan, atStart = null) {
  let found = null;
  return (from) => {
    if (found === null || found.start < from) found = scan(from);
    if (atStart !== null && found.start > from) return atStart(from) || found;
    return found;
  };
}

function delimited(text, kind) {
  const { open, opens, closes } = kind;
  const width = open.length;
  // closeAt[x]: the first closer at x or after, -1 for none
  const closeAt = new Int32Array(text.length + 2).fill(-1);
  for (let e = text.length - width; e >= 0; e -= 1) {
    closeAt[e] = text.startsWith(open, e) && closes(text, e) ? e : closeAt[e + 1];
  }
  const spanAt = (i, from) => {
    if (!text.startsWith(open, i) || !opens(text, i, from)) return null;
    const end = closeAt[i + width + 1]; // after at least one character of text
    if (end < 0) return null;
    const inner = text.slice(i + width, end);
    return {
      start: i,
      end: end + width,
      make: () => {
        const node = el(kind.tag);
        renderInline(inner, node);
        return node;
      },
    };
  };
  const scan = (from) => {
    for (let i = text.indexOf(open, from); i >= 0; i = text.indexOf(open, i + 1)) {
      const span = spanAt(i, from);
      if (span) return span;
    }
    return NONE;
  };
  return spans(scan, kind.lookBehind ? (from) => spanAt(from, from) : null);
}

function codeSpans(text) {
  // runs of backticks: a closer is a whole run as long as the opener
  const runStarts = new Map(); // length → starts of the runs that long, ascending
  const runEnd = new Int32Array(text.length + 1);
  for (let i = text.length - 1; i >= 0; i -= 1) {
    runEnd[i] = text[i] === "`" ? (text[i + 1] === "`" ? runEnd[i + 1] : i + 1) : i;
  }
  for (let i = 0; i < text.length; i = Math.max(runEnd[i], i + 1)) {
    if (text[i] !== "`") continue;
    const length = runEnd[i] - i;
    if (!runStarts.has(length)) runStarts.set(length, []);
    runStarts.get(length).push(i);
  }
  const looked = new Map(); // length → index into its runStarts (searches only move on)
  const runAfter = (length, after) => {
    const starts = runStarts.get(length);
    if (!starts) return -1;
    let k = looked.get(length) || 0;
    while (k < starts.length && starts[k] <= after) k += 1;
    looked.set(length, k);
    return k < starts.length ? starts[k] : -1;
  };
  const scan = (from) => {
    for (let i = text.indexOf("`", from); i >= 0; i = text.indexOf("`", runEnd[i])) {
      const end = runEnd[i];
      // an opener is the rest of a run from where the search starts in it, longest first
      for (let open = i; open < end; open += 1) {
        const close = runAfter(end - open, end);
        if (close >= 0) {
          const code = text.slice(end, close);
          return { start: open, end: close + end - open, make: () => el("code", "", code) };
        }
      }
    }
    return NONE;
  };
  return spans(scan);
}

function linkSpans(text) {
  // stopAt[x]: the first "]" or newline at x or after (the end of a link's text)
  const stopAt = new Int32Array(text.length + 1).fill(text.length);
  for (let x = text.length - 1; x >= 0; x -= 1) {
    stopAt[x] = text[x] === "]" || text[x] === "\n" ? x : stopAt[x + 1];
  }
  const targets = new Map(); // position of "](" → [url, end] or null
  const target = (at) => {
    if (!targets.has(at)) targets.set(at, linkTarget(text, at));
    return targets.get(at);
  };
  const scan = (from) => {
    for (let i = text.indexOf("[", from); i >= 0; i = text.indexOf("[", i + 1)) {
      const stop = stopAt[i + 1];
      const found = stop > i + 1 && text[stop] === "]" ? target(stop) : null;
      if (found) {
        const [url, end] = found;
        const m = [text.slice(i, end), text.slice(i + 1, stop), url];
        return { start: i, end, make: () => link(m) };
      }
    }
    return NONE;
  };
  return spans(scan);
}

// After a link's text, at its "]": `(\s*<?URL>?\s*)`. Returns [URL, end] or null.
function linkTarget(text, at) {
  if (text[at + 1] !== "(") return null;
  let i = at + 2;
  while (isSpace(text.charAt(i))) i += 1;
  if (text[i] === "<") i += 1;
  const urlStart = i;
  while (i < text.length && !isSpace(text[i]) && !"<>()".includes(text[i])) i += 1;
  if (i === urlStart) return null;
  const url = text.slice(urlStart, i);
  if (text[i] === ">") i += 1;
  while (isSpace(text.charAt(i))) i += 1;
  return text[i] === ")" ? [url, i + 1] : null;
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
