"""``segshare-export``: pack a trained model into one versioned zip.

    segshare-export model_path=outputs/train/RUN output=model.zip
    segshare-export model_path=CROSSVAL_DIR output=hippocampus.zip openvino=true \\
        metadata.name=hippocampus-5fold metadata.licence=CC-BY-SA-4.0
    segshare-predict model_path=hippocampus.zip input=scans/ output=preds/

``run(cfg)`` is the Hydra wrapper of :func:`segshare.inference.package.export_package`.
Exit status 2 with one line for a user's mistake (a missing run, a bad output name).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from segshare.cli import USER_ERRORS, exit_on_user_error


def run(cfg: DictConfig) -> dict:
    """Writes the package described by a composed ``export.yaml``; returns its manifest."""
    from segshare.inference.package import export_package

    model_path = cfg.model_path
    model_path = OmegaConf.to_object(model_path) if OmegaConf.is_config(model_path) else model_path
    metadata = {k: v for k, v in OmegaConf.to_container(cfg.metadata).items() if v is not None}
    return export_package(
        model_path,
        cfg.output,
        metadata=metadata,
        openvino=bool(cfg.openvino),
        saved_model=bool(cfg.saved_model),
    )


@hydra.main(version_base="1.3", config_path="pkg://segshare.conf", config_name="export")
def main(cfg: DictConfig) -> None:
    """Console entry point ``segshare-export model_path=RUN output=X.zip``."""
    with exit_on_user_error("segshare-export", [((*USER_ERRORS, OSError), 2)]):
        manifest = run(cfg)
    extras = [k for k in ("openvino", "saved_model") if cfg[k]]
    print(
        f"segshare-export: {len(manifest['runs'])} model(s), {len(manifest['files'])} files"
        + (f" (+ {', '.join(extras)})" if extras else "")
        + (", postprocessing" if manifest["postprocessing"] else "")
        + f" -> {cfg.output}"
    )


if __name__ == "__main__":
    main()
