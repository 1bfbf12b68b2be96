// Items of the Responses API as DOM: user messages as plain text, the assistant's as
// Markdown with their citations, tool calls as collapsible cards. Text from the model,
// files or the user only ever reaches the page through textContent.

import { renderMarkdown } from "./markdown.js";

export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function button(label, className, onClick, ariaLabel) {
  const b = el("button", className, label);
  b.type = "button";
  if (ariaLabel) b.setAttribute("aria-label", ariaLabel);
  b.addEventListener("click", onClick);
  return b;
}

// The text of a message item's content parts.
export function messageText(item) {
  if (typeof item.content === "string") return item.content;
  return (item.content || []).map((part) => part.text || part.refusal || "").join("");
}

export function userBubble(text) {
  const bubble = el("div", "bubble user");
  const plain = el("div", "plain", text);
  plain.dir = "auto"; // right to left when it starts so (Arabic, Hebrew)
  bubble.append(plain);
  return bubble;
}

// The assistant's message: Markdown, then its file/url citations as links.
export function assistantBody(item, openFile) {
  const body = el("div", "assistant-body");
  body.append(renderMarkdown(messageText(item)));
  const citations = (item.content || []).flatMap((part) => part.annotations || []);
  if (citations.length) body.append(citationList(citations, openFile));
  return body;
}

function citationList(annotations, openFile) {
  const list = el("ol", "citations");
  list.setAttribute("aria-label", "Sources");
  const seen = new Set();
  for (const note of annotations) {
    const key = note.file_id || note.url;
    if (!key || seen.has(key)) continue;
    seen.add(key);
    const li = el("li");
    if (note.type === "file_citation" || note.type === "container_file_citation") {
      const a = el("a", "citation", note.filename || note.file_id);
      a.dir = "auto";
      a.href = `/v1/files/${encodeURIComponent(note.file_id)}/content`;
      a.dataset.fileId = note.file_id;
      a.addEventListener("click", (event) => {
        event.preventDefault();
        openFile(note.file_id, note.filename || note.file_id);
      });
      li.append(a);
    } else if (note.type === "url_citation" && /^https?:/i.test(note.url)) {
      const a = el("a", "citation", note.title || note.url);
      a.href = note.url;
      a.rel = "noopener noreferrer nofollow";
      a.target = "_blank";
      li.append(a);
    } else {
      continue;
    }
    list.append(li);
  }
  return list;
}

function pretty(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text || "";
  }
}

// A tool call or result as a <details> card: what was asked, and what came back.
export function toolCard(item) {
  const card = el("details", `tool-card ${item.status || ""}`);
  const summary = el("summary");
  const sections = [];
  if (item.type === "code_interpreter_call") {
    summary.textContent = `Code interpreter (${item.status || "running"})`;
    sections.push(["Code", item.code || ""]);
    for (const out of item.outputs || []) {
      if (out.type === "logs") sections.push(["Output", out.logs]);
      if (out.type === "image" && /^data:image\/(png|jpeg|gif|webp);base64,/.test(out.url || "")) {
        const img = el("img", "tool-image");
        img.alt = "code interpreter image output";
        img.src = out.url;
        sections.push(["Image", img]);
      }
    }
  } else if (item.type === "function_call") {
    summary.textContent = `Tool call: ${item.name}`;
    sections.push(["Arguments", pretty(item.arguments)]);
  } else if (item.type === "function_call_output") {
    summary.textContent = "Tool result";
    sections.push(["Output", typeof item.output === "string" ? item.output : pretty(JSON.stringify(item.output))]);
  } else if (item.type === "file_search_call") {
    summary.textContent = `File search (${item.status || "running"})`;
    sections.push(["Queries", (item.queries || []).join("\n")]);
    for (const result of item.results || []) {
      sections.push([result.filename || result.file_id || "result", result.text || ""]);
    }
  } else {
    summary.textContent = item.type;
    sections.push(["Item", JSON.stringify(item, null, 2)]);
  }
  card.append(summary);
  for (const [label, content] of sections) {
    card.append(el("div", "tool-label", label));
    if (typeof content === "string") {
      const pre = el("pre");
      pre.append(el("code", null, content));
      card.append(pre);
    } else {
      card.append(content);
    }
  }
  return card;
}

export function isToolItem(item) {
  return item.type !== "message" && item.type !== "reasoning";
}
