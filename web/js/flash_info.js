// SD3.5 Flash: pure formatting of the loaders' "sd35_flash.loader_info" payload into short display lines.
// No ComfyUI imports (tested under Node: tests/web/flash_info.test.mjs). Nothing here throws on bad input.
//
// Sizes are binary (1 KiB = 1024 B) with IEC labels, as `sd35-flash info` prints them.

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

const COMPONENTS = { mmdit: "MM-DiT", vae: "VAE", clip_l: "CLIP-L", clip_g: "CLIP-G" };
const MEMORY_PARTS = { mmdit: "MM-DiT", text_encoders: "text encoders", vae: "VAE" };
const MAX_TEXT = 120;

const isObject = (x) => x !== null && typeof x === "object" && !Array.isArray(x);

// Free text from the payload as one trimmed, single line; "" for null, objects and the like.
export function text(value) {
    if (typeof value === "number" || typeof value === "boolean") return String(value);
    if (typeof value !== "string") return "";
    const line = value.replace(/\s+/g, " ").trim();
    return line.length > MAX_TEXT ? `${line.slice(0, MAX_TEXT - 1)}…` : line;
}

// 0 -> "0 B", 512 -> "512 B", 1536 -> "1.5 KiB", 1288490189 -> "1.2 GiB"; "" unless a finite number >= 0.
export function formatBytes(n) {
    if (typeof n !== "number" || !Number.isFinite(n) || n < 0) return "";
    let unit = 0;
    let value = n;
    while (value >= 1024 && unit < UNITS.length - 1) {
        value /= 1024;
        unit += 1;
    }
    if (unit === 0) return `${Math.round(value)} B`;
    // One decimal below 10, none above; "1.0" reads "1", and a rounded 1024 moves up one unit.
    let shown = value < 9.95 ? value.toFixed(1).replace(/\.0$/, "") : String(Math.round(value));
    if (Number(shown) >= 1024 && unit < UNITS.length - 1) {
        shown = "1";
        unit += 1;
    }
    return `${shown} ${UNITS[unit]}`;
}

// [1, 0.9, 0.75, 0.5, 0] -> "1, 0.9, 0.75, 0.5, 0"; non-numbers show as "?"; "" unless a non-empty array.
export function formatSigmas(list) {
    if (!Array.isArray(list) || list.length === 0) return "";
    return list
        .map((s) => (typeof s === "number" && Number.isFinite(s) ? String(Number(s.toFixed(3))) : "?"))
        .join(", ");
}

// Steps a sigma grid gives: its values above 0 (the metadata grid may or may not end in 0); 0 if malformed.
export function sigmaSteps(list) {
    if (!Array.isArray(list)) return 0;
    return list.filter((s) => typeof s === "number" && Number.isFinite(s) && s > 0).length;
}

// {"mmdit": true, "vae": true, "clip_l": true, "clip_g": true, "t5": false}, "absent"
//   -> "MM-DiT, VAE, CLIP-L, CLIP-G, no T5-XXL". t5: "on" | "off" (in the file, not loaded) | "absent".
// Unknown keys set to true are listed by name; "" when nothing is known.
export function componentSummary(components, t5) {
    const found = isObject(components) ? components : {};
    const parts = Object.keys(COMPONENTS).filter((key) => found[key] === true).map((key) => COMPONENTS[key]);
    for (const key of Object.keys(found)) {
        if (!(key in COMPONENTS) && key !== "t5" && found[key] === true) parts.push(text(key));
    }
    if (t5 === "on") parts.push("T5-XXL");
    else if (t5 === "off") parts.push("T5-XXL (off)");
    else if (t5 === "absent") parts.push("no T5-XXL");
    else if (found.t5 === true) parts.push("T5-XXL");
    else if (found.t5 === false) parts.push("no T5-XXL");
    return parts.filter(Boolean).join(", ");
}

// {"mmdit": 1, "vae": 2, "total": 3} -> "3 B total (MM-DiT 1 B, VAE 2 B)"; "" when no size is usable.
export function memorySummary(memory) {
    if (!isObject(memory)) return "";
    const parts = [];
    for (const key of [...Object.keys(MEMORY_PARTS), ...Object.keys(memory)]) {
        if (key === "total" || parts.some((p) => p.key === key)) continue;
        const size = formatBytes(memory[key]);
        if (size) parts.push({ key, line: `${MEMORY_PARTS[key] ?? text(key)} ${size}` });
    }
    const detail = parts.map((p) => p.line).join(", ");
    const total = formatBytes(memory.total);
    if (!total) return detail;
    return detail ? `${total} total (${detail})` : `${total} total`;
}

// The payload's "info" -> display lines such as "Model: SD3.5 Large (MM-DiT)"; [] for anything not an object.
// Missing, null or malformed fields are left out; unknown fields are ignored.
export function infoLines(info) {
    const lines = [];
    if (!isObject(info)) return lines;
    const add = (label, value) => {
        if (value) lines.push(`${label}: ${value}`);
    };
    try {
        add("File", text(info.file));
        add("Model", text(info.architecture));
        add("Layout", text(info.layout));
        add("Components", componentSummary(info.components, info.t5));
        add("Weights", text(info.weight_format));
        const steps = sigmaSteps(info.student_sigmas);
        const sigmas = formatSigmas(info.student_sigmas);
        if (sigmas) add("Student grid", steps ? `${steps} step${steps === 1 ? "" : "s"} (${sigmas})` : sigmas);
        add("Sampler", text(info.sampler_mode));
        add("Memory", memorySummary(info.memory_bytes));
    } catch {
        // An exotic object (a throwing getter): keep the lines made so far.
    }
    return lines;
}

// A node from its execution id in a LiteGraph graph: "12", or "5:12" for node 12 inside the subgraph of node 5;
// null when there is none. Shared by both extensions.
export function findNode(graph, id) {
    if (typeof id !== "string" && typeof id !== "number") return null;
    let node = null;
    for (const part of String(id).split(":")) {
        if (!graph?.getNodeById || part.trim() === "") return null;
        node = graph.getNodeById(Number(part)) ?? graph.getNodeById(part) ?? null;
        if (!node) return null;
        graph = node.subgraph;
    }
    return node;
}
