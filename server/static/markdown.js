// A small Markdown renderer that builds DOM nodes and sets text only through textContent
// and createTextNode: model output is never parsed as HTML, so `<img onerror=...>` or
// `<script>` in it stays text. Links keep only http(s), mailto and same-origin paths;
// images become links (the page loads nothing remote). See docs/web.md for why it is
// hand-written rather than a vendored library.

const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)\s*$/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^\s{0,3}>\s?(.*)$/;
const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const TABLE_RULE = /^\s*\|?\s*:?-{1,}:?\s*(\|\s*:?-{1,}:?\s*)*\|?\s*$/;
// Quotes and lists nest no deeper than this (markdown-it stops at 20 in its CommonMark
// preset): a line of 20,000 `>` nested a quote a level per character, past the browser's
// stack, and the answer could not be shown at all. Deeper text is a plain paragraph.
const MAX_NESTING = 20;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// A block of text whose direction is its own (dir="auto": the first strong character's),
// so an Arabic or Hebrew paragraph reads right to left, its punctuation and list markers
// on the right side, beside English ones that read left to right. Code stays left to right.
function block(tag) {
  const node = el(tag);
  node.dir = "auto";
  return node;
}

// Renders `text` into a new <div class="markdown">.
export function renderMarkdown(text) {
  const root = el("div", "markdown");
  renderBlocks(text.replace(/\r\n?/g, "\n").split("\n"), root);
  return root;
}

function startsBlock(lines, i) {
  const line = lines[i];
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) ||
    ITEM.test(line) || isTableStart(lines, i);
}

function isTableStart(lines, i) {
  return lines[i].includes("|") && i + 1 < lines.length && lines[i + 1].includes("-") &&
    TABLE_RULE.test(lines[i + 1]);
}

function renderBlocks(lines, parent, depth = 0) {
  if (depth > MAX_NESTING) {
    paragraph(lines.filter((line) => line.trim()).map((line) => line.trim()), parent);
    return;
  }
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let match;
    if (!line.trim()) {
      i += 1;
    } else if ((match = FENCE.exec(line))) {
      i = codeBlock(lines, i + 1, match, parent);
    } else if ((match = HEADING.exec(line))) {
      const heading = block(`h${match[1].length}`);
      appendInline(heading, match[2]);
      parent.append(heading);
      i += 1;
    } else if (RULE.test(line)) {
      parent.append(el("hr"));
      i += 1;
    } else if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && (match = QUOTE.exec(lines[i]))) {
        inner.push(match[1]);
        i += 1;
      }
      const quote = block("blockquote");
      renderBlocks(inner, quote, depth + 1);
      parent.append(quote);
    } else if (ITEM.test(line)) {
      i = list(lines, i, parent, depth);
    } else if (isTableStart(lines, i)) {
      i = table(lines, i, parent);
    } else {
      const text = [];
      while (i < lines.length && lines[i].trim() && (!text.length || !startsBlock(lines, i))) {
        text.push(lines[i].trim());
        i += 1;
      }
      paragraph(text, parent);
    }
  }
}

// A paragraph of `lines`, each on a line of its own.
function paragraph(lines, parent) {
  const p = block("p");
  lines.forEach((text, n) => {
    if (n) p.append(el("br"));
    appendInline(p, text);
  });
  parent.append(p);
}

function codeBlock(lines, i, fence, parent) {
  const body = [];
  const closing = new RegExp(`^\\s{0,3}${fence[1][0]}{${fence[1].length},}\\s*$`);
  while (i < lines.length && !closing.test(lines[i])) {
    body.push(lines[i]);
    i += 1;
  }
  parent.append(codeFigure(body.join("\n"), fence[2]));
  return i + 1; // past the closing fence (or the end, while a stream is still writing it)
}

function codeFigure(code, language) {
  const figure = el("div", "code-block");
  const head = el("div", "code-head");
  head.append(el("span", "code-lang", language || "text"));
  const copy = el("button", "copy", "Copy");
  copy.type = "button";
  copy.setAttribute("aria-label", `Copy ${language || "code"}`);
  copy.addEventListener("click", () => copyText(code, copy));
  head.append(copy);
  const pre = el("pre");
  const codeNode = el("code");
  if (language) codeNode.dataset.language = language;
  highlight(code, language, codeNode);
  pre.append(codeNode);
  figure.append(head, pre);
  return figure;
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // Not a secure context (plain http on a LAN address): copy through a selection.
    const area = el("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

function list(lines, i, parent, depth) {
  const first = ITEM.exec(lines[i]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const node = block(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
  const items = [];
  let item = null;
  while (i < lines.length) {
    const line = lines[i];
    const match = ITEM.exec(line);
    const lineIndent = line.length - line.trimStart().length;
    if (match && match[1].length === indent && /\d/.test(match[2]) === ordered) {
      item = [match[3]];
      items.push(item);
    } else if (line.trim() && lineIndent > indent && item) {
      item.push(line.slice(Math.min(lineIndent, indent + 2)));
    } else if (!line.trim() && i + 1 < lines.length && item &&
               (lines[i + 1].length - lines[i + 1].trimStart().length > indent ||
                (ITEM.exec(lines[i + 1]) || [])[1]?.length === indent)) {
      item.push("");
    } else {
      break;
    }
    i += 1;
  }
  for (const itemLines of items) {
    const li = el("li");
    if (itemLines.length === 1) appendInline(li, itemLines[0]);
    else renderBlocks(itemLines, li, depth + 1);
    node.append(li);
  }
  parent.append(node);
  return i;
}

function cells(line) {
  let text = line.trim();
  if (text.startsWith("|")) text = text.slice(1);
  if (text.endsWith("|") && !text.endsWith("\\|")) text = text.slice(0, -1);
  return text.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
}

function table(lines, i, parent) {
  const wrap = el("div", "table-wrap");
  const node = block("table");
  const aligns = cells(lines[i + 1]).map((c) =>
    c.startsWith(":") && c.endsWith(":") ? "center" : c.endsWith(":") ? "right" : "");
  const head = el("thead");
  const headRow = el("tr");
  for (const cell of cells(lines[i])) {
    const th = el("th");
    appendInline(th, cell);
    headRow.append(th);
  }
  head.append(headRow);
  node.append(head);
  const body = el("tbody");
  i += 2;
  while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
    const row = el("tr");
    cells(lines[i]).forEach((cell, n) => {
      const td = el("td");
      if (aligns[n]) td.style.textAlign = aligns[n];
      appendInline(td, cell);
      row.append(td);
    });
    body.append(row);
    i += 1;
  }
  node.append(body);
  wrap.append(node);
  parent.append(wrap);
  return i;
}

const INLINE = new RegExp([
  /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source, // 1, 2: code span
  /\*\*(?=\S)([\s\S]*?\S)\*\*/.source, // 3: strong
  /__(?=\S)([\s\S]*?\S)__/.source, // 4: strong
  /\*(?=[^\s*])([\s\S]*?[^\s*])\*/.source, // 5: emphasis
  /\b_(?=[^\s_])([\s\S]*?[^\s_])_\b/.source, // 6: emphasis
  /~~(?=\S)([\s\S]*?\S)~~/.source, // 7: strikethrough
  // the target may hold balanced parentheses, one level deep (Wikipedia's Foo_(bar))
  /(!?)\[([^\]]*)\]\(\s*<?((?:[^()\s>]|\([^()\s>]*\))*)>?(?:\s+"[^"]*")?\s*\)/.source, // 8, 9, 10: link / image
  /(https?:\/\/[^\s<>()]+[^\s<>().,;:!?'"])/.source, // 11: bare URL
].join("|"), "g");

// A link target the page may point at: web links and same-origin paths, nothing that
// runs (javascript:, data:, vbscript: ...).
export function safeHref(url) {
  const text = url.trim();
  if (/^(https?:|mailto:)/i.test(text)) return text;
  if (text.startsWith("/") && !text.startsWith("//") && !text.startsWith("/\\")) return text;
  return null;
}

// A link showing `label` (inline Markdown) or, without one, its URL as plain text: the URL
// parsed as Markdown would be a bare URL again, and a link of itself without end.
function link(label, url) {
  const href = safeHref(url);
  if (!href) return document.createTextNode(label || url);
  const a = el("a");
  a.href = href;
  a.rel = "noopener noreferrer nofollow";
  a.target = "_blank";
  if (label) appendInline(a, label);
  else a.textContent = url;
  return a;
}

export function appendInline(parent, text) {
  let last = 0;
  // matchAll works on a copy of the pattern: the nested calls below do not move its cursor.
  for (const match of text.matchAll(INLINE)) {
    if (match.index > last) parent.append(document.createTextNode(text.slice(last, match.index)));
    last = match.index + match[0].length;
    if (match[1]) {
      parent.append(el("code", null, match[2].replace(/^ (.*) $/, "$1")));
    } else if (match[3] !== undefined || match[4] !== undefined) {
      const strong = el("strong");
      appendInline(strong, match[3] ?? match[4]);
      parent.append(strong);
    } else if (match[5] !== undefined || match[6] !== undefined) {
      const em = el("em");
      appendInline(em, match[5] ?? match[6]);
      parent.append(em);
    } else if (match[7] !== undefined) {
      const del = el("del");
      appendInline(del, match[7]);
      parent.append(del);
    } else if (match[10] !== undefined) {
      const image = match[8] === "!";
      parent.append(link(image ? `image: ${match[9] || match[10]}` : match[9], match[10]));
    } else if (match[11]) {
      parent.append(link("", match[11]));
    }
  }
  if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
}

// -- highlighting ---------------------------------------------------------------------

const KEYWORDS = new Set((
  "and as assert async await break case catch class const continue def default del do " +
  "elif else enum except export extends false False finally fn for from func function go " +
  "if impl import in interface is lambda let loop match mod mut new nil None nonlocal not " +
  "null or package pass pub raise return self static struct super switch this throw true " +
  "True try type typeof use var void while with yield SELECT FROM WHERE GROUP BY ORDER " +
  "JOIN LEFT RIGHT INNER OUTER ON AS AND OR NOT INSERT INTO VALUES UPDATE SET DELETE " +
  "CREATE TABLE LIMIT HAVING DISTINCT COUNT SUM AVG MIN MAX CASE WHEN THEN END NULL"
).split(" "));

const HASH_COMMENTS = new Set(["python", "py", "bash", "sh", "shell", "zsh", "ruby", "rb", "r",
  "yaml", "yml", "toml", "perl", "make", "makefile", "dockerfile", "ini", "conf"]);
const DASH_COMMENTS = new Set(["sql", "lua", "haskell", "hs"]);

function commentPattern(language) {
  const lang = (language || "").toLowerCase();
  if (HASH_COMMENTS.has(lang)) return /#[^\n]*/.source;
  if (DASH_COMMENTS.has(lang)) return /--[^\n]*/.source;
  return /\/\/[^\n]*|\/\*[\s\S]*?\*\//.source;
}

// Wraps comments, strings, numbers and keywords in spans (classes tok-*), as text.
export function highlight(code, language, parent) {
  const pattern = new RegExp([
    `(${commentPattern(language)})`,
    /("(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|`(?:[^`\\]|\\.)*`)/.source,
    /\b(\d+(?:\.\d+)?(?:e[+-]?\d+)?|0x[\da-f]+)\b/.source,
    /\b([A-Za-z_]\w*)\b/.source,
  ].join("|"), "gi");
  let last = 0;
  let match;
  while ((match = pattern.exec(code))) {
    const [whole, comment, string, number, word] = match;
    const kind = comment ? "comment" : string ? "string" : number ? "number" :
      word && KEYWORDS.has(word) ? "keyword" : null;
    if (!kind) continue;
    if (match.index > last) parent.append(document.createTextNode(code.slice(last, match.index)));
    parent.append(el("span", `tok-${kind}`, whole));
    last = match.index + whole.length;
  }
  if (last < code.length) parent.append(document.createTextNode(code.slice(last)));
}
