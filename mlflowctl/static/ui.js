// mlflowctl ui: live refresh without reloading, version choice, copy buttons. No third-party code.
(function () {
  "use strict";
  const body = document.body;
  let digest = body.dataset.digest || "";
  let version = body.dataset.version || "";
  const pollMs = Math.max(250, (parseFloat(body.dataset.poll) || 1.5) * 1000);
  const ids = ["header", "pipeline", "versions", "drift"];
  let timer = null;
  let busy = false;

  function setLive(ok) {
    const el = document.getElementById("live-status");
    if (!el) return;
    el.dataset.live = ok ? "yes" : "no";
    el.textContent = ok ? "live" : "disconnected: is mlflowctl ui still running?";
  }

  async function poll(force) {
    if (busy) return;
    busy = true;
    try {
      const q = new URLSearchParams({ since: force ? "" : digest });
      if (version) q.set("version", version);
      const r = await fetch("/api/sections?" + q.toString(), { cache: "no-store" });
      if (!r.ok) throw new Error("HTTP " + r.status);
      const data = await r.json();
      if (data.changed) {
        for (const id of ids) {
          const el = document.getElementById(id);
          if (el && typeof data.sections[id] === "string") el.innerHTML = data.sections[id];
        }
        digest = data.digest;
        body.dataset.digest = digest;
        body.dataset.updates = String((parseInt(body.dataset.updates || "0", 10) || 0) + 1);
      }
      setLive(true);
    } catch (e) {
      setLive(false);
    } finally {
      busy = false;
      clearTimeout(timer);
      timer = setTimeout(() => poll(false), pollMs);
    }
  }

  document.addEventListener("click", (ev) => {
    const pick = ev.target.closest("a.pick[data-version]");
    if (pick) {
      ev.preventDefault();
      version = pick.dataset.version;
      body.dataset.version = version;
      history.replaceState(null, "", "?version=" + encodeURIComponent(version));
      poll(true);
      return;
    }
    const copy = ev.target.closest("button.copy[data-copy]");
    if (copy) {
      const src = document.getElementById(copy.dataset.copy);
      if (!src) return;
      const text = src.textContent;
      const done = () => { copy.textContent = "copied"; copy.classList.add("copied"); };
      if (navigator.clipboard && navigator.clipboard.writeText) {
        navigator.clipboard.writeText(text).then(done, () => selectText(src));
      } else {
        selectText(src);
      }
    }
  });

  function selectText(el) {
    const range = document.createRange();
    range.selectNodeContents(el);
    const sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
  }

  timer = setTimeout(() => poll(false), pollMs);
})();
