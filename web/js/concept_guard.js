// Concept Guard frontend extension: a status line and a live loss sparkline on our training nodes.
// The server sends "concept_guard.progress" events: {node, phase} when a phase starts (the first one of a
// run clears the previous run's status and chart) and {node, step, total, loss} after every training step.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const CHART_HEIGHT = 28;
const MAX_POINTS = 400;

function nodeOf(id) {
  return app.graph?.getNodeById?.(Number(id));
}

function onProgress(event) {
  const { node, phase, step, total, loss } = event.detail ?? {};
  const target = nodeOf(node);
  if (!target) return;
  if (phase !== undefined) {
    const done = String(phase).startsWith("done");
    if (!target.cg_running && !done) target.cg_losses = [];
    target.cg_running = !done;
    target.cg_phase = phase;
    target.title_status = phase;
  } else {
    const losses = (target.cg_losses ??= []);
    losses.push(Number(loss));
    if (losses.length > MAX_POINTS) losses.splice(0, losses.length - MAX_POINTS);
    target.title_status = `${target.cg_phase ?? "training"} · step ${step}/${total} · loss ${Number(loss).toPrecision(4)}`;
  }
  target.setDirtyCanvas?.(true, false);
}

function onError(event) {
  const { node_id, exception_message } = event.detail ?? {};
  const target = nodeOf(node_id);
  if (!target || !String(target.comfyClass ?? "").startsWith("ConceptGuard")) return;
  target.cg_running = false;
  target.title_status = `failed: ${String(exception_message ?? "").split("\n")[0].slice(0, 80)}`;
  target.setDirtyCanvas?.(true, false);
}

function drawSparkline(ctx, node) {
  const losses = (node.cg_losses ?? []).filter(Number.isFinite);
  if (losses.length < 2) return;
  const w = node.size[0] - 12;
  const bottom = node.size[1] - 18;
  const lo = Math.min(...losses);
  const hi = Math.max(...losses);
  const span = hi - lo || 1;
  ctx.strokeStyle = "#6c6";
  ctx.lineWidth = 1;
  ctx.beginPath();
  losses.forEach((v, i) => {
    const x = 6 + (i / (losses.length - 1)) * w;
    const y = bottom - ((v - lo) / span) * CHART_HEIGHT;
    if (i === 0) ctx.moveTo(x, y);
    else ctx.lineTo(x, y);
  });
  ctx.stroke();
}

app.registerExtension({
  name: "concept_guard.progress",
  setup() {
    api.addEventListener("concept_guard.progress", onProgress);
    api.addEventListener("execution_error", onError);
  },
  nodeCreated(node) {
    if (!String(node.comfyClass ?? "").startsWith("ConceptGuard")) return;
    const onDrawForeground = node.onDrawForeground;
    node.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      if (this.flags?.collapsed) return;
      ctx.save();
      drawSparkline(ctx, this);
      if (this.title_status) {
        ctx.font = "11px sans-serif";
        ctx.fillStyle = "#9c9";
        ctx.fillText(this.title_status, 6, this.size[1] - 6);
      }
      ctx.restore();
    };
  },
});
