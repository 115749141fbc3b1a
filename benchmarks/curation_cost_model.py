"""What a whole curation costs at web scale (10^9 images x 1024-d by default) on N nodes of 8 GPUs
and 112 CPU cores: the multiply-adds of every term that grows with the pool, counted from the
algorithms in dinoscale/curation, turned into time with rates measured here and rates of a GPU.
Four scenarios: level 1 fitted as the preset says or on all points, and the inverted file's list
scans on the CPU cores (as dinoscale runs them: faiss's CPU index) or on the GPUs.

    python -m benchmarks.curation_cost_model [--images 1e9] [--preset curate/web_4level]
        [--backbone dinov3_vitl16] [--gpu h100] [--nodes 8 16 32] [--results benchmarks/results.json]
        [--markdown]

Work (multiply-adds, "MACs", as faiss counts them):
  embed    the backbone's forward per image (fvcore count, `dinoscale models`)
  dedup    inverted file of `n_inverted_lists(n)` lists: training its centroids (Lloyd on 64 rows per
           list), assigning every row to a list and finding every query's `nprobe` lists (float32
           GEMMs), scanning the probed lists (8-bit codes, one byte per MAC); an exact index below
           `ivf_min_size` rows (n^2 d)
  k-means  per fit of m points into k clusters: greedy k-means++ on min(m, seeding_points_per_cluster
           k) points, (2 + ln k) candidates per seed; n_iter Lloyd iterations; then every item of the
           level assigned once per fit; a level's fits are its first one (on train_sample points at
           level 1 when set) and one per resampling step (on k sample_size points); level 1's split
           fits every first-level cluster into n_split
Rates:
  this CPU   each stage's MACs per CPU-second in bench_curation_scale's runs (`results.json`), the
             benchmark's own settings fed to the same formulas; stable across sizes when the formulas
             hold
  list scans one CPU core's bytes per second through faiss's CPU inverted file, measured at run time
  a GPU      faiss's documented k-means speed (its wiki, "Low level benchmarks": 1.28e14 MACs in 55 s
             on one P100 in float32, 34 s in float16) as a fraction of the P100 SXM2's datasheet peak,
             applied to the GPU's datasheet peak: float32 for every nearest-centroid search (faiss) and
             the inverted lists' GEMMs, bf16 for k-means++'s screening GEMM; list scans at the GPU's
             memory bandwidth, every probed code read once per query; the embedding forward at an
             assumed 40% MFU in bf16
  network    400 Gb/s per GPU and 30 us per small collective (assumed, an InfiniBand NDR fabric):
             dedup's query broadcasts and answer gathers, k-means' cluster-sum all-reduces (int64)
             and k-means++'s three small collectives per seed
Not modelled: reading images and decoding them (the embed stage's CPU side), reading embeddings
(2 TB in float16 at 10^9 x 1024-d: from the page cache after the first pass when each node holds its
rows), writing shards, and the sampling (linear in the pool, seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from dinoscale.config import load_config
from dinoscale.curation.collective import BLOCK_ROWS
from dinoscale.curation.config import DedupConfig, KMeansConfig
from dinoscale.curation.knn import MIN_RERANK_MARGIN, QUANTIZER_ITERATIONS, TRAINING_POINTS_PER_LIST, n_inverted_lists
from dinoscale.models.describe import count_gflops
from dinoscale.models.presets import preset_spec
from dinoscale.models.spec import BackboneSpec

HERE = Path(__file__).parent
GPUS_PER_NODE = 8
CPU_CORES_PER_NODE = 112  # a DGX H100: 2 x 56-core Xeon 8480C
NETWORK_BYTES_PER_S = 50e9
COLLECTIVE_LATENCY_S = 30e-6
EMBED_MFU = 0.40
# faiss wiki, Low level benchmarks: k-means of 1M x 256-d into 20,000 centroids, 25 iterations
FAISS_KMEANS_MACS, FAISS_P100_FP32_S, FAISS_P100_FP16_S = 1.28e14, 55.0, 34.0
P100_FP32_FLOPS, P100_FP16_FLOPS = 10.6e12, 21.2e12  # P100 SXM2 datasheet


@dataclass(frozen=True)
class Gpu:
    name: str
    fp32_flops: float  # datasheet peaks, dense
    bf16_flops: float
    memory_bytes_per_s: float

    def macs_per_s(self, kind: str) -> float:
        """Sustained rate of a term's kind on this GPU (bytes/s for list scans)."""
        faiss_fp32 = FAISS_KMEANS_MACS / FAISS_P100_FP32_S / (P100_FP32_FLOPS / 2)
        faiss_fp16 = FAISS_KMEANS_MACS / FAISS_P100_FP16_S / (P100_FP16_FLOPS / 2)
        return {"fp32": faiss_fp32 * self.fp32_flops / 2, "bf16": faiss_fp16 * self.bf16_flops / 2,
                "scan": self.memory_bytes_per_s, "embed": EMBED_MFU * self.bf16_flops / 2}[kind]


GPUS = {"h100": Gpu("NVIDIA H100 SXM", 67e12, 989e12, 3.35e12),
        "a100": Gpu("NVIDIA A100 SXM 80GB", 19.5e12, 312e12, 2.04e12)}


@dataclass
class Term:
    stage: str
    what: str
    macs: float
    kind: str  # fp32 | bf16 | scan | embed


@dataclass
class Exchange:
    """What one rank sends and waits for: bytes over the network, and small collectives."""

    bytes_per_rank: float = 0.0
    collectives: float = 0.0


# ----------------------------------------------------------------------------- work
def embed_terms(n: int, spec: BackboneSpec, name: str) -> list[Term]:
    """The backbone's forward on every image (the copy-detection embedder, when separate, is small)."""
    return [Term("embed", f"{name} forward at {spec.img_size} px", n * count_gflops(spec) * 1e9, "embed")]


def dedup_terms(n: int, d: int, cfg: DedupConfig) -> tuple[list[Term], Exchange]:
    """Near-duplicate search of every row against all (`dedup._near_duplicate_links`), and per rank: the
    queries it receives (float32 rows, their lists, ids) and the answers it sends (id, score, above,
    index score per candidate); a query block costs 8 collectives."""
    candidates = cfg.k + 1  # the stage asks for k + 1 (a row finds itself)
    if n < cfg.ivf_min_size:
        return [Term("dedup", "exact k-NN search", float(n) * n * d, "fp32")], Exchange(
            n * (4 * d + 17 * candidates), 8 * n / BLOCK_ROWS)
    nlist = n_inverted_lists(n)
    nprobe = min(cfg.nprobe, nlist)
    training = TRAINING_POINTS_PER_LIST * nlist
    candidates += max(candidates, MIN_RERANK_MARGIN)
    terms = [Term("dedup", f"train {nlist:,} list centroids", QUANTIZER_ITERATIONS * float(training) * nlist * d,
                  "fp32"),
             Term("dedup", f"find each row's {nprobe} nearest lists (its list, and its probes as a query)",
                  float(n) * nlist * d, "fp32"),
             Term("dedup", f"scan {nprobe} lists per query (8-bit codes)", float(n) * nprobe * (n / nlist) * d, "scan")]
    return terms, Exchange(n * (4 * d + 8 * nprobe + 8 + 17 * candidates), 8 * n / BLOCK_ROWS)


def kmeans_terms(n: int, d: int, cfg: KMeansConfig) -> tuple[list[Term], Exchange]:
    """Every fit of `fit_hierarchical_kmeans` on n items (upper bounds: Lloyd may stop early)."""
    terms: list[Term] = []
    exchange = Exchange()

    def fit(level: str, m: float, k: int, times: float = 1.0) -> None:
        population = min(m, cfg.seeding_points_per_cluster * k)
        candidates = 2 + int(math.log(k))
        terms.append(Term("kmeans", f"{level}: k-means++ seeding", times * k * candidates * population * d, "bf16"))
        terms.append(Term("kmeans", f"{level}: Lloyd", times * cfg.n_iter * m * k * d, "fp32"))
        if m > BLOCK_ROWS:  # smaller fits are one block, which one rank fits alone
            exchange.bytes_per_rank += times * cfg.n_iter * 2 * k * d * 8  # ring all-reduce of int64 sums
            exchange.collectives += times * 3 * k  # per seed: the candidates, their improvements, a length

    items = n
    for i, wanted in enumerate(cfg.n_clusters):
        k, level = min(wanted, items), f"level {i + 1}"
        train = min(items, cfg.train_sample) if i == 0 and cfg.train_sample else items
        resampling = cfg.n_resampling_steps[i] if cfg.sample_size[i] > 1 else 0
        fit(level, train, k)
        if resampling:
            fit(f"{level}, {resampling} resampling steps", min(items, k * cfg.sample_size[i]), k, times=resampling)
        terms.append(Term("kmeans", f"{level}: assign its {items:,} items", (1 + resampling) * float(items) * k * d,
                          "fp32"))
        if i == 0 and cfg.n_split > 1:
            fit(f"{level} split", items / k, cfg.n_split, times=k)
            terms.append(Term("kmeans", f"{level} split: assign", float(items) * cfg.n_split * d, "fp32"))
            k *= cfg.n_split
        items = k
    return terms, exchange


# ----------------------------------------------------------------------------- rates measured here
def measured_cpu_rates(results: Path) -> list[dict]:
    """Per size of bench_curation_scale's runs: each stage's MACs per CPU-second (all ranks' CPU time), from
    the run on the fewest processes."""
    entry = json.loads(results.read_text())["benchmarks"]["curation_scale"]["result"]
    rows = []
    for row in entry["results"]:
        run = min(row["runs"], key=lambda r: r["processes"])
        dedup, _ = dedup_terms(row["n"], entry["dim"], DedupConfig(**entry["dedup"]))
        kmeans, _ = kmeans_terms(run["kept"], entry["dim"], KMeansConfig(**entry["kmeans"]))
        rows.append({"n": row["n"], **{
            f"{stage}_macs_per_cpu_s": sum(t.macs for t in terms) / run["stages"][stage]["cpu_s"]
            for stage, terms in (("dedup", dedup), ("kmeans", kmeans))}})
    return rows


def measure_list_scan_rate(n: int = 200_000, d: int = 256, queries: int = 2000, nprobe: int = 8) -> float:
    """Bytes of 8-bit codes one CPU core scans per second in faiss's IndexIVFScalarQuantizer, as the
    sharded index calls it (`search_preassigned`), on random unit rows."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(d), d, n_inverted_lists(n), faiss.ScalarQuantizer.QT_8bit,
                                          faiss.METRIC_INNER_PRODUCT, False)
    index.train(x[:100_000])
    index.add(x)
    index.nprobe = nprobe
    _, probes = index.quantizer.search(x[:queries], nprobe)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        start = time.process_time()
        index.search_preassigned(x[:queries], 32, probes, np.zeros(probes.shape, np.float32))
        seconds = time.process_time() - start
    finally:
        faiss.omp_set_num_threads(threads)
    return sum(index.invlists.list_size(int(lst)) for lst in probes.ravel()) * d / seconds


# ----------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class Node:
    """A GPU node: its GPUs run every GEMM, the embedding forward and (`scan_on_gpu`) the list scans;
    otherwise its CPU cores scan the lists, as dinoscale does today (faiss's CPU inverted file)."""

    gpu: Gpu
    cpu_scan_bytes_per_s: float  # one core
    scan_on_gpu: bool = False
    gpus: int = GPUS_PER_NODE
    cpu_cores: int = CPU_CORES_PER_NODE

    def seconds(self, term: Term) -> float:
        if term.kind == "scan" and not self.scan_on_gpu:
            return term.macs / (self.cpu_cores * self.cpu_scan_bytes_per_s)
        return term.macs / (self.gpus * self.gpu.macs_per_s(term.kind))


def cost(n: int, preset: str, backbone: str, node: Node, nodes: list[int], level_1_on_all_points: bool) -> dict:
    """The model for `n` images curated with `preset` (its level 1 fitted on all points, or as the preset
    says) on each of `nodes` nodes; the embeddings are `backbone`'s."""
    cfg = load_config(preset, ["curation.kmeans.train_sample=null"] if level_1_on_all_points else []).curation
    spec = preset_spec(backbone)
    d = spec.embed_dim
    dedup, dedup_exchange = dedup_terms(n, d, cfg.dedup)
    kmeans, kmeans_exchange = kmeans_terms(n, d, cfg.kmeans)
    terms = embed_terms(n, spec, backbone) + dedup + kmeans
    node_hours: dict[str, float] = {}
    for t in terms:
        node_hours[t.stage] = node_hours.get(t.stage, 0.0) + node.seconds(t) / 3600
    network_hours = {stage: (e.bytes_per_rank / NETWORK_BYTES_PER_S + e.collectives * COLLECTIVE_LATENCY_S) / 3600
                     for stage, e in (("dedup", dedup_exchange), ("kmeans", kmeans_exchange))}
    on_nodes = []
    for n_nodes in nodes:
        wall = {stage: hours / n_nodes + network_hours.get(stage, 0.0) for stage, hours in node_hours.items()}
        on_nodes.append({"nodes": n_nodes, "wall_hours": {s: round(h, 2) for s, h in wall.items()},
                         "total_wall_hours": round(sum(wall.values()), 2),
                         "node_hours": round(n_nodes * sum(wall.values()), 1)})
    return {"images": n, "dim": d, "preset": preset, "train_sample": cfg.kmeans.train_sample, "backbone": backbone,
            "node": {"gpu": node.gpu.name, "gpus": node.gpus, "cpu_cores": node.cpu_cores,
                     "list_scans_on": "GPUs" if node.scan_on_gpu else "CPU cores"},
            "gpu_rates_macs_per_s": {k: node.gpu.macs_per_s(k) for k in ("fp32", "bf16", "scan", "embed")},
            "cpu_scan_bytes_per_core_s": node.cpu_scan_bytes_per_s,
            "terms": [{"stage": t.stage, "what": t.what, "macs": t.macs, "kind": t.kind,
                       "node_hours": round(node.seconds(t) / 3600, 3)} for t in terms],
            "node_hours_of_work": {s: round(h, 1) for s, h in node_hours.items()},
            "network_hours": {s: round(h, 3) for s, h in network_hours.items()},
            "dominant_stage": max(node_hours, key=node_hours.get), "on_nodes": on_nodes}


def cpu_core_hours(model: dict, rates: list[dict]) -> int:
    """Core-hours of dedup and k-means on CPUs alone, at the rates measured here on the largest pool."""
    largest = max(rates, key=lambda r: r["n"])
    return round(sum(t["macs"] / largest[f"{t['stage']}_macs_per_cpu_s"] for t in model["terms"]
                     if t["stage"] in ("dedup", "kmeans")) / 3600)


SCENARIOS = {"preset_today": (False, False), "preset_gpu_list_scans": (False, True),
             "all_points_today": (True, False), "all_points_gpu_list_scans": (True, True)}


def markdown(report: dict) -> str:
    """The model as the README shows it."""
    models = [report[name] for name in SCENARIOS]
    first = models[0]
    head = [f"level 1 on {'all points' if m['train_sample'] is None else format(m['train_sample'], ',') + ' points'}, "
            f"list scans on {m['node']['list_scans_on']}" for m in models]
    node = first["node"]
    lines = [f"| {first['images']:.0e} images x {first['dim']}-d, `{first['preset']}`, nodes of {node['gpus']} "
             f"{node['gpu']} + {node['cpu_cores']} cores | " + " | ".join(head) + " |",
             "|---" * (len(models) + 1) + "|"]
    for stage in first["node_hours_of_work"]:
        lines.append(f"| {stage}: node-hours of work | " + " | ".join(
            f"{m['node_hours_of_work'][stage]:,.1f}" for m in models) + " |")
    for i, on in enumerate(first["on_nodes"]):
        runs = [m["on_nodes"][i] for m in models]
        lines.append(f"| on {on['nodes']} nodes: wall hours (node-hours) | " + " | ".join(
            f"{r['total_wall_hours']:,.2f} ({r['node_hours']:,.0f})" for r in runs) + " |")
    if "cpu_core_hours" in first:
        lines.append("| dedup + k-means on CPU cores alone at the rates measured here: core-hours | " + " | ".join(
            f"{m['cpu_core_hours']:,}" for m in models) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=float, default=1e9)
    parser.add_argument("--preset", default="curate/web_4level")
    parser.add_argument("--backbone", default="dinov3_vitl16", help="embedding model (a preset of `dinoscale models`)")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    parser.add_argument("--nodes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--results", type=Path, default=HERE / "results.json",
                        help="bench_curation_scale's measurements (a results.json of the suite)")
    parser.add_argument("--markdown", action="store_true", help="print the README's table instead of the JSON")
    args = parser.parse_args(argv)
    scan_rate = measure_list_scan_rate()
    rates = measured_cpu_rates(args.results) if args.results.exists() else None
    report: dict = {"measured_cpu_rates": rates, "list_scan_bytes_per_core_s": scan_rate}
    for name, (all_points, scan_on_gpu) in SCENARIOS.items():
        node = Node(GPUS[args.gpu], scan_rate, scan_on_gpu)
        report[name] = cost(int(args.images), args.preset, args.backbone, node, args.nodes, all_points)
        if rates:
            report[name]["cpu_core_hours"] = cpu_core_hours(report[name], rates)
    if args.markdown:
        print(markdown(report))
    else:
        json.dump(report, sys.stdout, indent=2)
        print()


if __name__ == "__main__":
    main()
