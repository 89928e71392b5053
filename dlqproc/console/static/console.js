// Live progress of a replay job: polls its JSON and updates the page's text
// (textContent only, never HTML). Loaded as a file: the CSP forbids inline script.
"use strict";
(function () {
  const box = document.getElementById("job");
  if (!box) return;
  const url = box.dataset.poll;
  const set = (id, v) => { const el = document.getElementById(id); if (el) el.textContent = String(v); };
  async function tick() {
    let p;
    try {
      const r = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      if (!r.ok) throw new Error(String(r.status));
      p = await r.json();
    } catch (e) {
      setTimeout(tick, 2000);
      return;
    }
    for (const k of ["state", "done", "published", "refused", "failed", "skipped", "paused"]) set("job-" + k, p[k]);
    set("job-total", p.total === null ? "?" : p.total);
    const bar = document.getElementById("job-bar");
    if (bar) { if (p.total !== null) bar.max = p.total; bar.value = p.done; }
    if (p.finished) { box.classList.add("finished"); const s = document.getElementById("stop-form"); if (s) s.remove(); }
    else setTimeout(tick, 500);
  }
  tick();
})();
