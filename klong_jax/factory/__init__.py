"""Research-Factory: research papers -> PaperBench-layout tasks -> rubrics -> teacher trajectories.

Stages (each resumable and cached per paper in OUT/manifest.json, see `manifest`):
  ingest, decontaminate   `ingest.run_ingest(papers_dir, out_dir, manifest, eval_set)`: Markdown / LaTeX /
                          PDF papers into OUT/tasks/<id>/{paper.md, addendum.md, blacklist.txt,
                          config.yaml}; papers matching the evaluation set (`decontaminate`, PaperBench
                          by default) are skipped with the reason recorded;
  later stages            plug in by name through `Manifest.stage(paper_id, name, input_hash)`;
  report                  `manifest.write_report(manifest)`: OUT/report.json and OUT/report.txt.

Submodules are imported explicitly (`from klong_jax.factory import ingest`); this package imports none
of them, so importing one stage never pulls in another's dependencies. Imports no JAX.
"""
