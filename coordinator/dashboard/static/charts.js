// The overview's chart controls: dragging across a chart asks the server for that step range
// (so a zoomed range is read at full resolution), and moving the smoothing slider asks for the
// charts smoothed with its weight. Both go through the controls' form, which works without this
// script too. Each chart names its x domain and plot area (data-x-domain, data-plot) in
// viewBox units; the charts are replaced on every refresh, so listeners sit on the document.
"use strict";
(function () {
  const MIN_DRAG = 3; // viewBox units: a shorter drag is a click
  const SVG_NS = "http://www.w3.org/2000/svg";
  let drag = null;

  function numbers(text) {
    return text.split(" ").map(Number);
  }

  function viewBoxX(svg, bounds, clientX) {
    return ((clientX - bounds.left) * svg.viewBox.baseVal.width) / bounds.width;
  }

  function stepAt(x) {
    const [first, last] = drag.domain;
    const [left, right] = drag.plot;
    const clamped = Math.min(Math.max(x, left), right);
    return first + ((clamped - left) * (last - first)) / (right - left);
  }

  function drawSelection(x) {
    const [left, right, top, bottom] = drag.plot;
    const clamped = Math.min(Math.max(x, left), right);
    drag.rect.setAttribute("x", String(Math.min(drag.startX, clamped)));
    drag.rect.setAttribute("width", String(Math.abs(clamped - drag.startX)));
    drag.rect.setAttribute("y", String(top));
    drag.rect.setAttribute("height", String(bottom - top));
  }

  document.addEventListener("pointerdown", (event) => {
    const svg = event.target.closest ? event.target.closest("#charts svg.chart[data-x-domain]") : null;
    const form = document.getElementById("chart-controls");
    if (!svg || !form || event.button !== 0) return;
    event.preventDefault();
    const bounds = svg.getBoundingClientRect();
    const plot = numbers(svg.dataset.plot);
    const startX = Math.min(Math.max(viewBoxX(svg, bounds, event.clientX), plot[0]), plot[1]);
    const rect = document.createElementNS(SVG_NS, "rect");
    rect.setAttribute("class", "zoom-selection");
    svg.appendChild(rect);
    drag = { svg, form, bounds, plot, domain: numbers(svg.dataset.xDomain), startX, rect };
    document.body.dataset.holdRefresh = "zooming";
    drawSelection(startX);
  });

  document.addEventListener("pointermove", (event) => {
    if (drag) drawSelection(viewBoxX(drag.svg, drag.bounds, event.clientX));
  });

  document.addEventListener("pointerup", (event) => {
    if (!drag) return;
    const { form, rect, startX } = drag;
    const endX = viewBoxX(drag.svg, drag.bounds, event.clientX);
    const steps = [stepAt(startX), stepAt(endX)].sort((a, b) => a - b);
    const since = Math.max(0, Math.ceil(steps[0]));
    const until = Math.floor(steps[1]);
    rect.remove();
    drag = null;
    delete document.body.dataset.holdRefresh;
    if (Math.abs(endX - startX) < MIN_DRAG || until < since) return;
    form.elements.since.value = String(since);
    form.elements.until.value = String(until);
    form.requestSubmit();
  });

  document.addEventListener("input", (event) => {
    if (event.target.id !== "smoothing") return;
    const shown = event.target.form.querySelector("output[for=smoothing]");
    if (shown) shown.textContent = event.target.value;
  });

  document.addEventListener("change", (event) => {
    if (event.target.id === "smoothing") event.target.form.requestSubmit();
  });
})();
