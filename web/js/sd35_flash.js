// SD3.5 Flash ComfyUI extension: shows what a Flash loader detected (architecture, components, T5, weights,
// student grid, memory) on the loader node, in a read-only "detected" text box, after each run.
//
// Server side: PromptServer.instance.send_sync("sd35_flash.loader_info", {"node": <unique_id>, "info": {...}}).
// This file is served at /extensions/<pack>/js/, so ComfyUI's /scripts/ is three levels up.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { ComfyWidgets } from "../../../scripts/widgets.js";
import { findNode, infoLines } from "./flash_info.js";

const EVENT = "sd35_flash.loader_info";
const WIDGET = "detected";
const LINE_HEIGHT = 16; // px per text line, for the box's minimum height


// The node's "detected" widget, made once: read-only, kept out of the prompt and the saved workflow.
function detectedWidget(node) {
    const existing = node.widgets?.find((w) => w.name === WIDGET);
    if (existing) return existing;
    const widget = ComfyWidgets.STRING(node, WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false; // not in the workflow's widgets_values
    widget.options ??= {};
    widget.options.serialize = false; // not sent as an input, so it never busts the node's cache
    if (widget.inputEl) {
        widget.inputEl.readOnly = true;
        widget.inputEl.style.opacity = "0.75";
    }
    return widget;
}

function show(node, lines) {
    const widget = detectedWidget(node);
    widget.value = lines.join("\n");
    widget.options.getMinHeight = () => lines.length * LINE_HEIGHT + 12;
    requestAnimationFrame(() => {
        const [width, height] = node.computeSize();
        node.setSize([Math.max(node.size[0], width), Math.max(node.size[1], height)]);
        node.setDirtyCanvas(true, true);
        app.graph.setDirtyCanvas(true, true);
    });
}

app.registerExtension({
    name: EVENT,
    setup() {
        api.addEventListener(EVENT, (event) => {
            const detail = event?.detail;
            const node = findNode(app.graph, detail?.node);
            const lines = infoLines(detail?.info);
            if (!node || lines.length === 0) return;
            try {
                show(node, lines);
            } catch (error) {
                console.warn(`[${EVENT}] could not show the loader info on node ${detail.node}:`, error);
            }
        });
    },
});
