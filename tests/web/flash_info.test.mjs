// Tests for web/js/flash_info.js (the front end's pure formatting). Run: node --test tests/web/
import assert from "node:assert/strict";
import { test } from "node:test";

import {
    componentSummary,
    findNode,
    formatBytes,
    formatSigmas,
    infoLines,
    memorySummary,
    sigmaSteps,
    text,
} from "../../web/js/flash_info.js";

const FULL = {
    file: "sd35_flash_demo.safetensors",
    architecture: "SD3.5 Large (MM-DiT)",
    layout: "official single file",
    components: { mmdit: true, vae: true, clip_l: true, clip_g: true, t5: false },
    t5: "absent",
    weight_format: "bf16",
    student_sigmas: [1.0, 0.9, 0.75, 0.5, 0.0],
    sampler_mode: "euler",
    memory_bytes: { mmdit: 1024 ** 3, text_encoders: 256 * 1024 ** 2, vae: 80 * 1024 ** 2, total: 1.33 * 1024 ** 3 },
};

test("formatBytes: binary units, one decimal below 10", () => {
    assert.equal(formatBytes(0), "0 B");
    assert.equal(formatBytes(512), "512 B");
    assert.equal(formatBytes(1023), "1023 B");
    assert.equal(formatBytes(1024), "1 KiB");
    assert.equal(formatBytes(1536), "1.5 KiB");
    assert.equal(formatBytes(512 * 1024 ** 2), "512 MiB");
    assert.equal(formatBytes(1.2 * 1024 ** 3), "1.2 GiB");
    assert.equal(formatBytes(9.96 * 1024 ** 3), "10 GiB");
    assert.equal(formatBytes(1023.7 * 1024 ** 2), "1 GiB"); // rounds up into the next unit, not "1024 MiB"
    assert.equal(formatBytes(2 * 1024 ** 6), "2048 PiB");
});

test("formatBytes: anything but a finite number >= 0 gives an empty string", () => {
    for (const bad of [null, undefined, -1, NaN, Infinity, "1024", {}, [], true, 10n]) {
        assert.equal(formatBytes(bad), "", String(bad));
    }
});

test("formatSigmas and sigmaSteps", () => {
    assert.equal(formatSigmas([1.0, 0.9, 0.75, 0.5, 0.0]), "1, 0.9, 0.75, 0.5, 0");
    assert.equal(formatSigmas([1, 0.33333333]), "1, 0.333");
    assert.equal(formatSigmas([1, "x", null]), "1, ?, ?");
    for (const bad of [null, undefined, [], "1, 0.5", { 0: 1 }]) assert.equal(formatSigmas(bad), "");
    assert.equal(sigmaSteps([1.0, 0.9, 0.75, 0.5, 0.0]), 4); // with the final 0
    assert.equal(sigmaSteps([1.0, 0.75]), 2); // the metadata form, without it
    assert.equal(sigmaSteps(null), 0);
});

test("componentSummary: found parts, then the T5 state", () => {
    assert.equal(componentSummary(FULL.components, "absent"), "MM-DiT, VAE, CLIP-L, CLIP-G, no T5-XXL");
    assert.equal(componentSummary({ clip_l: true, clip_g: true, t5: true }, "on"), "CLIP-L, CLIP-G, T5-XXL");
    assert.equal(componentSummary({ mmdit: true, t5: true }, "off"), "MM-DiT, T5-XXL (off)");
    assert.equal(componentSummary({ mmdit: true, t5: true }), "MM-DiT, T5-XXL"); // state missing: from the flag
    assert.equal(componentSummary({ vae: true, lora: true, mmdit: false }, null), "VAE, lora"); // unknown key kept
    assert.equal(componentSummary(null, "on"), "T5-XXL");
    assert.equal(componentSummary(null, "weird"), "");
    assert.equal(componentSummary("mmdit", undefined), "");
    assert.equal(componentSummary([true, true], undefined), "");
    assert.equal(componentSummary({ vae: "yes", clip_l: 1 }, undefined), ""); // only true counts
});

test("memorySummary: total first, parts in a fixed order, bad sizes left out", () => {
    assert.equal(memorySummary(FULL.memory_bytes), "1.3 GiB total (MM-DiT 1 GiB, text encoders 256 MiB, VAE 80 MiB)");
    assert.equal(memorySummary({ vae: 1024, mmdit: 2048 }), "MM-DiT 2 KiB, VAE 1 KiB");
    assert.equal(memorySummary({ total: 0 }), "0 B total");
    assert.equal(memorySummary({ total: "big", vae: -5, extra: 512 }), "extra 512 B");
    assert.equal(memorySummary(null), "");
    assert.equal(memorySummary(42), "");
});

test("text: one trimmed line, scalars only, long text cut", () => {
    assert.equal(text("  a\n b\t c "), "a b c");
    assert.equal(text(3), "3");
    assert.equal(text(null), "");
    assert.equal(text({ a: 1 }), "");
    assert.equal(text("x".repeat(500)).length, 120);
});

test("infoLines: a full payload", () => {
    assert.deepEqual(infoLines(FULL), [
        "File: sd35_flash_demo.safetensors",
        "Model: SD3.5 Large (MM-DiT)",
        "Layout: official single file",
        "Components: MM-DiT, VAE, CLIP-L, CLIP-G, no T5-XXL",
        "Weights: bf16",
        "Student grid: 4 steps (1, 0.9, 0.75, 0.5, 0)",
        "Sampler: euler",
        "Memory: 1.3 GiB total (MM-DiT 1 GiB, text encoders 256 MiB, VAE 80 MiB)",
    ]);
});

test("infoLines: a text-encoder loader (no MM-DiT, nulls, missing keys)", () => {
    const info = {
        file: "clip_g.safetensors",
        architecture: null,
        components: { clip_l: true, clip_g: true, t5: true },
        t5: "off",
        student_sigmas: null,
        sampler_mode: null,
        memory_bytes: { text_encoders: 1.5 * 1024 ** 3 },
    };
    assert.deepEqual(infoLines(info), [
        "File: clip_g.safetensors",
        "Components: CLIP-L, CLIP-G, T5-XXL (off)",
        "Memory: text encoders 1.5 GiB",
    ]);
});

test("infoLines: unknown extra fields are ignored, a one-step grid is singular", () => {
    const lines = infoLines({ file: "a.safetensors", student_sigmas: [1.0], future: { x: 1 }, quant: "int8" });
    assert.deepEqual(lines, ["File: a.safetensors", "Student grid: 1 step (1)"]);
    assert.deepEqual(infoLines({ weight_format: "int8" }), ["Weights: int8"]);
});

test("infoLines: malformed input never throws", () => {
    for (const bad of [null, undefined, 0, "info", [], [FULL], true, () => FULL]) {
        assert.deepEqual(infoLines(bad), [], String(bad));
    }
    assert.deepEqual(infoLines({}), []);
    const wrongTypes = {
        file: { name: "x" },
        architecture: ["SD3.5"],
        layout: 7,
        components: "all",
        t5: 1,
        weight_format: null,
        student_sigmas: "1,0",
        sampler_mode: {},
        memory_bytes: [1, 2],
    };
    assert.deepEqual(infoLines(wrongTypes), ["Layout: 7"]);
    const throwing = { file: "ok.safetensors", get layout() { throw new Error("boom"); } };
    assert.deepEqual(infoLines(throwing), ["File: ok.safetensors"]);
    assert.deepEqual(infoLines(Object.create(null)), []);
});

test("findNode: plain ids, subgraph paths, and nothing for unknown or malformed ids", () => {
    const inner = { id: 3, subgraph: null };
    const outer = { id: 5, subgraph: { getNodeById: (id) => (id === 3 ? inner : null) } };
    const graph = { getNodeById: (id) => (id === 5 ? outer : null) };
    assert.equal(findNode(graph, "5"), outer);
    assert.equal(findNode(graph, 5), outer);
    assert.equal(findNode(graph, "5:3"), inner);
    assert.equal(findNode(graph, "5:4"), null);
    assert.equal(findNode(graph, "7"), null);
    assert.equal(findNode(graph, "5:"), null);
    assert.equal(findNode(graph, null), null);
    assert.equal(findNode(null, "5"), null);
});
