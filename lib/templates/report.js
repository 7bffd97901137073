// Mark figures that did not load, and leave counts on <body> for headless checks (data-figures-loaded / -broken).
window.addEventListener("load", function () {
  var loaded = 0, broken = 0;
  Array.prototype.forEach.call(document.images, function (img) {
    if (img.complete && img.naturalWidth > 0) { loaded++; return; }
    broken++;
    img.classList.add("broken");
    var warn = document.createElement("p");
    warn.className = "broken-warning";
    warn.textContent = "\u26A0 Figure failed to load: " + img.getAttribute("src");
    img.insertAdjacentElement("afterend", warn);
  });
  document.body.dataset.figuresLoaded = loaded;
  document.body.dataset.figuresBroken = broken;
});
// Click (or Enter on) a column header of a key table to sort by it.
function sortBy(th) {
  var table = th.closest("table"), body = table.tBodies[0];
  var col = Array.prototype.indexOf.call(th.parentNode.children, th);
  var dir = th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending";
  Array.prototype.forEach.call(th.parentNode.children, function (h) { h.removeAttribute("aria-sort"); });
  th.setAttribute("aria-sort", dir);
  var rows = Array.prototype.slice.call(body.rows);
  rows.sort(function (a, b) {
    var x = a.cells[col], y = b.cells[col], c;
    if (x.hasAttribute("data-v") && y.hasAttribute("data-v")) {
      var u = x.dataset.v === "" ? Infinity : +x.dataset.v, v = y.dataset.v === "" ? Infinity : +y.dataset.v;
      c = u === v ? 0 : (u < v ? -1 : 1);
    } else {
      c = x.textContent.localeCompare(y.textContent, undefined, {numeric: true});
    }
    return dir === "ascending" ? c : -c;
  });
  rows.forEach(function (r) { body.appendChild(r); });
}
document.addEventListener("click", function (e) {
  var th = e.target.closest && e.target.closest("table.sortable thead th");
  if (th) sortBy(th);
});
document.addEventListener("keydown", function (e) {
  var th = e.target.closest && e.target.closest("table.sortable thead th");
  if (th && (e.key === "Enter" || e.key === " ")) { e.preventDefault(); sortBy(th); }
});
