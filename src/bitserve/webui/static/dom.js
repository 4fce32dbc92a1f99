// The one DOM helper every module of the page uses: an element with a class and text.
// Text is always set as textContent, never parsed as HTML.

export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}
