"""``vilbert features``: region features of a dataset root into a feature store (or import existing ones)."""

from __future__ import annotations

from typing import Annotated

import typer


def features_command(
    output: Annotated[
        str, typer.Option(help="Feature store to create or resume: a local folder or s3://bucket/prefix.")
    ],
    dataset: Annotated[
        str, typer.Option(help="Dataset root (local or s3://) with manifest.parquet; not used by --backend import.")
    ] = "",
    backend: Annotated[
        str,
        typer.Option(
            help="'demo' (trains a small detector for the synthetic world on annotations/instances.json), "
            "'detector' (Faster R-CNN R50-FPN, --weights), or 'import' (existing features, --import-path)."
        ),
    ] = "demo",
    weights: Annotated[
        str | None,
        typer.Option(
            help="detector: torchvision fasterrcnn_resnet50_fpn state dict (.pt/.pth/.safetensors), path or s3://."
        ),
    ] = None,
    min_size: Annotated[int, typer.Option(help="detector: shorter image side after resizing.")] = 600,
    max_size: Annotated[int, typer.Option(help="detector: longest image side after resizing.")] = 1000,
    proposals: Annotated[int, typer.Option(help="detector: RPN proposals per image scored by the box head.")] = 300,
    demo_model: Annotated[
        str | None, typer.Option(help="demo: a trained demo detector folder to use instead of training one.")
    ] = None,
    demo_epochs: Annotated[int, typer.Option(help="demo: training epochs.")] = 10,
    demo_train_images: Annotated[int, typer.Option(help="demo: training images at most (split train).")] = 400,
    demo_eval_images: Annotated[
        int, typer.Option(help="demo: held-out images (split val, else test) on which box recall is measured.")
    ] = 100,
    import_format: Annotated[str | None, typer.Option(help="import: tsv, lmdb or hdf5.")] = None,
    import_path: Annotated[
        list[str] | None, typer.Option(help="import: a features file or LMDB folder (repeat for several files).")
    ] = None,
    feature_size: Annotated[int, typer.Option(help="import: D of the imported features.")] = 2048,
    num_classes: Annotated[int, typer.Option(help="import: C of the imported class distributions.")] = 1601,
    allow_uniform_class_probs: Annotated[
        bool, typer.Option(help="import: accept files without class probabilities (uniform placeholder).")
    ] = False,
    min_boxes: Annotated[int, typer.Option(help="Fewest regions per image (top-scoring ones fill up).")] = 10,
    max_boxes: Annotated[int, typer.Option(help="Most regions per image (K).")] = 36,
    conf_threshold: Annotated[float, typer.Option(help="Keep regions whose best class score reaches this.")] = 0.2,
    nms_threshold: Annotated[float, typer.Option(help="Per-class NMS IoU threshold.")] = 0.3,
    split: Annotated[
        list[str] | None, typer.Option(help="Extract only this manifest split (repeat for several; default all).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Extract at most this many images (smoke runs).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per backend call.")] = 8,
    num_workers: Annotated[
        int, typer.Option(help="Extraction processes (each writes its own store part; merged at the end).")
    ] = 1,
    threads: Annotated[
        int | None,
        typer.Option(help="torch threads per process (default: CPU cores / processes; demo: 1, use processes)."),
    ] = None,
    read_workers: Annotated[int, typer.Option(help="Threads per process reading and decoding images.")] = 8,
    resume: Annotated[
        bool, typer.Option(help="Skip images already in the store (--no-resume: refuse a non-empty store).")
    ] = True,
    device: Annotated[str, typer.Option(help="torch device: cpu, cuda, cuda:1, ...")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed for the demo detector's training.")] = 0,
    max_quarantine_fraction: Annotated[
        float, typer.Option(help="Exit with status 2 when more than this share of the images is quarantined.")
    ] = 0.1,
    work_dir: Annotated[
        str | None, typer.Option(help="Local scratch folder (staging of an s3:// store); default: a temp folder.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Extract region features (boxes, features, class distributions) for every image, resumably."""
    import json
    import sys
    from dataclasses import asdict

    from rich.console import Console

    from components.features.backends import BackendError, BoxLimits, DemoOptions, DetectorOptions
    from components.features.spec import FeatureSpecMismatch
    from components.steps.features import FeaturesConfig, FeaturesFailed, ImportOptions, run_features
    from components.storage import StorageError

    console = Console(width=None if sys.stdout.isatty() else 160, stderr=False)
    try:
        imports = None
        if backend == "import":
            if not import_format or not import_path:
                raise ValueError("--backend import needs --import-format and --import-path")
            imports = ImportOptions(
                import_format, tuple(import_path), allow_uniform_class_probs, feature_size, num_classes
            )
        config = FeaturesConfig(
            dataset=dataset,
            output=output,
            backend=backend,
            boxes=BoxLimits(min_boxes, max_boxes, conf_threshold, nms_threshold),
            splits=tuple(split or ()),
            limit=limit,
            batch_size=batch_size,
            num_workers=num_workers,
            threads=threads,
            read_workers=read_workers,
            resume=resume,
            device=device,
            seed=seed,
            max_quarantine_fraction=max_quarantine_fraction,
            work_dir=work_dir,
            progress=progress,
            detector=DetectorOptions(weights=weights, min_size=min_size, max_size=max_size, proposals=proposals),
            demo=DemoOptions(
                model_dir=demo_model,
                epochs=demo_epochs,
                train_images=demo_train_images,
                eval_images=demo_eval_images,
            ),
            imports=imports,
        )
        result = run_features(config, log=lambda msg: console.print(msg, markup=False, highlight=False))
        status = 0
    except FeaturesFailed as exc:
        console.print(f"[red]{exc}[/]")
        result, status = exc.result, 2
    except (ValueError, BackendError, FeatureSpecMismatch, StorageError, FileExistsError) as exc:
        console.print(f"[red]features failed: {exc}[/]")
        raise typer.Exit(1) from None
    summary = {k: v for k, v in asdict(result).items() if k not in ("backend_report",)}
    console.print_json(json.dumps(summary, default=str))
    if result.backend_report:
        console.print_json(json.dumps({"backend_report": result.backend_report}, default=str))
    raise typer.Exit(status)
