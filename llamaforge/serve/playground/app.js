// The playground: the server's own OpenAI API, from the browser, with nothing but fetch.
"use strict";

const $ = (id) => document.getElementById(id);
let models = [];
let history = [];

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}

function showError(message) { $("error").textContent = message || ""; }

async function apiError(response) {
  try { return (await response.json()).error.message; } catch (e) { return response.status + " " + response.statusText; }
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) { showError(await apiError(response)); return; }
  models = (await response.json()).data;
  $("model").innerHTML = "";
  for (const m of models) {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.id + (m.kind === "classifier" ? " (classifier)" : "");
    $("model").appendChild(option);
  }
  selectTabFor($("model").value);
}

function kindOf(name) { const m = models.find((x) => x.id === name); return m ? m.kind : "lm"; }

function selectTab(panel) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.panel === panel);
  for (const p of document.querySelectorAll(".panel")) p.classList.toggle("hidden", p.id !== panel);
}

function selectTabFor(name) { selectTab(kindOf(name) === "classifier" ? "classify" : "chat"); }

function addMessage(role, text) {
  const li = document.createElement("li");
  li.className = role;
  li.textContent = text;
  $("messages").appendChild(li);
  $("messages").scrollTop = $("messages").scrollHeight;
  return li;
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text) return;
  showError("");
  $("prompt").value = "";
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  const messages = ($("system").value.trim() ? [{ role: "system", content: $("system").value.trim() }] : []).concat(history);
  $("send").disabled = true;
  const started = performance.now();
  let tokens = 0, first = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(),
      body: JSON.stringify({ model: $("model").value, messages, stream: true,
                             temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value) }),
    });
    if (!response.ok) throw new Error(await apiError(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices.length ? chunk.choices[0].delta.content : "";
        if (delta) {
          if (first === null) first = performance.now();
          tokens += 1;
          reply.textContent += delta;
          $("messages").scrollTop = $("messages").scrollHeight;
        }
      }
    }
    history.push({ role: "assistant", content: reply.textContent });
    const seconds = (performance.now() - (first || started)) / 1000;
    $("speed").textContent = tokens > 1 ? `${(tokens / seconds).toFixed(1)} tokens/s, first token after ` +
      `${(((first || started) - started) / 1000).toFixed(2)} s` : "";
  } catch (e) {
    showError(e.message);
    history.pop();
  } finally {
    $("send").disabled = false;
  }
}

async function classify(event) {
  event.preventDefault();
  const text = $("classify-text").value.trim();
  if (!text) return;
  showError("");
  $("classify-send").disabled = true;
  try {
    const response = await fetch("/v1/classify", {
      method: "POST", headers: headers(), body: JSON.stringify({ model: $("model").value, input: [text] }),
    });
    if (!response.ok) throw new Error(await apiError(response));
    const result = (await response.json()).data[0];
    const box = $("classify-result");
    box.innerHTML = "";
    result.labels.forEach((label, i) => {
      const row = document.createElement("div");
      row.className = "bar" + (label === result.label ? " best" : "");
      row.innerHTML = `<span class="label"></span><span class="track"><span class="fill"></span></span><span class="p"></span>`;
      row.querySelector(".label").textContent = label;
      row.querySelector(".fill").style.width = `${(result.probs[i] * 100).toFixed(1)}%`;
      row.querySelector(".fill").style.display = "block";
      row.querySelector(".p").textContent = result.probs[i].toFixed(3);
      box.appendChild(row);
    });
  } catch (e) {
    showError(e.message);
  } finally {
    $("classify-send").disabled = false;
  }
}

$("chat-form").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) send(e); });
$("classify-form").addEventListener("submit", classify);
$("reset").addEventListener("click", () => { history = []; $("messages").innerHTML = ""; $("speed").textContent = ""; });
$("model").addEventListener("change", () => { history = []; $("messages").innerHTML = ""; selectTabFor($("model").value); });
$("key").addEventListener("change", loadModels);
for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => selectTab(tab.dataset.panel));
loadModels();
