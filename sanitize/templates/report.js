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
