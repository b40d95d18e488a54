// Keeps a dashboard page current without reloading it: numbers marked data-field come from
// the JSON API named by <body data-api>; sections marked data-live are replaced by the same
// sections of a fresh copy of this page (not while <body data-hold-refresh> is set: the user is
// dragging across a chart). Text is set with textContent only.
"use strict";
(function () {
  const PERIOD_MS = 5000;

  function formatted(value, digits) {
    if (value === null || value === undefined) return "–";
    if (typeof value !== "number") return String(value);
    return digits === undefined ? String(value) : value.toFixed(Number(digits));
  }

  async function refreshFields() {
    const fields = document.querySelectorAll("[data-field]");
    const source = document.body.dataset.api;
    if (!fields.length || !source) return;
    const response = await fetch(source, { headers: { Accept: "application/json" } });
    if (!response.ok) return;
    const data = await response.json();
    for (const element of fields) {
      if (element.dataset.field in data) {
        element.textContent = formatted(data[element.dataset.field], element.dataset.digits);
      }
    }
  }

  async function refreshSections() {
    const sections = document.querySelectorAll("[data-live][id]");
    if (!sections.length || document.body.dataset.holdRefresh) return;
    const response = await fetch(window.location.href, { headers: { Accept: "text/html" } });
    if (!response.ok) return;
    const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
    for (const section of sections) {
      const replacement = fresh.getElementById(section.id);
      if (replacement) section.replaceWith(document.adoptNode(replacement));
    }
  }

  async function refresh() {
    try {
      await Promise.all([refreshFields(), refreshSections()]);
      document.body.dataset.refreshed = String(Date.now());
    } catch (error) {
      document.body.dataset.refreshError = String(error);
    }
  }

  window.setInterval(refresh, PERIOD_MS);
})();
