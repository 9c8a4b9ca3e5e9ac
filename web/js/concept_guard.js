// Concept Guard frontend extension: shows the running training loss on our training nodes.
// The server sends "concept_guard.progress" events ({node, step, total, loss}) during training.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

app.registerExtension({
  name: "concept_guard.progress",
  setup() {
    api.addEventListener("concept_guard.progress", (event) => {
      const { node, step, total, loss } = event.detail ?? {};
      const target = app.graph?.getNodeById?.(Number(node));
      if (!target) return;
      target.title_status = `step ${step}/${total} · loss ${Number(loss).toPrecision(4)}`;
      target.setDirtyCanvas?.(true, false);
    });
  },
  nodeCreated(node) {
    if (!String(node.comfyClass ?? "").startsWith("ConceptGuard")) return;
    const onDrawForeground = node.onDrawForeground;
    node.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      if (!this.title_status || this.flags?.collapsed) return;
      ctx.save();
      ctx.font = "11px sans-serif";
      ctx.fillStyle = "#9c9";
      ctx.fillText(this.title_status, 6, this.size[1] - 6);
      ctx.restore();
    };
  },
});
