(function () {
  // a click on a thumbnail enlarges it (4x) and a second click shrinks it back: the images are inline, no network
  document.addEventListener("click", function (event) {
    var figure = event.target.closest && event.target.closest("figure");
    if (figure && event.target.tagName === "IMG") { figure.classList.toggle("enlarged"); }
  });
})();
(function () {
  var select = document.getElementById("projection-class");
  if (!select) { return; }
  function show() {
    var plots = document.querySelectorAll("[data-projection]");
    for (var i = 0; i < plots.length; i++) {
      plots[i].hidden = plots[i].getAttribute("data-projection") !== select.value;
    }
  }
  select.addEventListener("change", show);
  show();
})();
