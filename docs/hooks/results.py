"""MkDocs hook: the committed measurements in ``benchmarks/results/`` become the site's ``results/`` pages, so the
manual links to the files the benchmarks write instead of copying their numbers."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def on_files(files: Files, config) -> Files:
    names = sorted(p.name for p in RESULTS.iterdir() if p.suffix in {".md", ".png", ".csv"})
    for name in names:
        files.append(File(f"results/{name}", str(RESULTS.parent), config["site_dir"], config["use_directory_urls"]))
    pages = [n for n in names if n.endswith(".md")]
    index = ["# Result files", "", "Every benchmark writes its table here, naming the machine it ran on.", ""]
    index += [f"- [{n.removesuffix('.md')}]({n})" for n in pages]
    files.append(File.generated(config, "results/index.md", content="\n".join(index) + "\n"))
    return files
