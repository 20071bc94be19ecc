// Herald web console: confirmations, copy buttons and the live view. No framework, no build.
"use strict";

document.addEventListener("submit", (event) => {
  const form = event.target;
  const question = form.dataset.confirm;
  if (question && !window.confirm(question)) {
    event.preventDefault();
    return;
  }
  const busy = form.dataset.busy;
  const button = form.querySelector("button[type=submit]");
  if (busy && button) {
    // Disabled after this event, so the button's own submission still goes out.
    setTimeout(() => { button.disabled = true; button.textContent = busy; }, 0);
  }
});

document.addEventListener("click", (event) => {
  const button = event.target.closest("[data-copy]");
  if (!button) return;
  const source = document.getElementById(button.dataset.copy);
  if (source && navigator.clipboard) {
    navigator.clipboard.writeText(source.textContent.trim()).then(() => {
      button.textContent = "Copied";
      setTimeout(() => { button.textContent = "Copy"; }, 1500);
    });
  }
});

function cell(text, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  td.textContent = text;
  return td;
}

function startLive(table) {
  const rows = document.getElementById("live-rows");
  const empty = document.getElementById("live-empty");
  const status = document.getElementById("live-status");
  const setStatus = (state, text) => { status.dataset.state = state; status.textContent = text; };
  const source = new EventSource(table.dataset.src);
  source.addEventListener("open", () => setStatus("open", "Live"));
  source.addEventListener("error", () => {
    setStatus(source.readyState === EventSource.CLOSED ? "closed" : "connecting",
      source.readyState === EventSource.CLOSED ? "Disconnected: reload the page" : "Reconnecting…");
  });
  source.addEventListener("attempt", (message) => {
    const a = JSON.parse(message.data);
    const tr = document.createElement("tr");
    tr.className = "fresh";
    tr.dataset.delivery = a.delivery_id;
    tr.appendChild(cell(a.started_at));
    const link = document.createElement("a");
    link.href = "/deliveries/" + encodeURIComponent(a.delivery_id);
    const code = document.createElement("code");
    code.textContent = a.delivery_id;
    link.appendChild(code);
    const td = document.createElement("td");
    td.appendChild(link);
    tr.appendChild(td);
    tr.appendChild(cell(a.outcome + (a.error_message ? " (" + a.error_message + ")" : "")));
    tr.appendChild(cell(a.duration_ms + " ms", "num"));
    const state = document.createElement("span");
    state.className = "state state-" + a.state;
    state.textContent = a.state_label;
    const stateCell = document.createElement("td");
    stateCell.appendChild(state);
    tr.appendChild(stateCell);
    rows.insertBefore(tr, rows.firstChild);
    while (rows.children.length > 200) rows.removeChild(rows.lastChild);
    if (empty) empty.hidden = true;
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const live = document.getElementById("live");
  if (live) startLive(live);
});
