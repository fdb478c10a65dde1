"""mlflowctl: one command from raw data to a tested, monitored model endpoint."""
from setuptools import setup

setup(
    name="mlflowctl",
    version="0.1.0",
    description="One doit pipeline from raw data to a tested, monitored model endpoint, on a laptop or Kubernetes",
    python_requires=">=3.10",
    packages=["mlflowctl", "mlflowctl.testing", "mlflowctl_plugins"],
    package_dir={"mlflowctl_plugins": "plugins"},
    # the page of `mlflowctl ui`: Jinja2 templates and its own CSS/JS (no third-party code)
    # `mlflowctl plugin new`: the scaffold's templates
    package_data={"mlflowctl": ["templates/ui/*.html", "static/*.css", "static/*.js", "templates/scaffold/*/*.tmpl"]},
    # The orchestrator's own dependencies. TensorFlow is needed only by the
    # stage code (image/requirements.txt), never imported by mlflowctl itself.
    install_requires=[
        "pluggy>=1.3",
        "doit>=0.36",
        "PyYAML>=6",
        "requests>=2.28",
        "docker>=7",
        "kubernetes>=28",
        "Jinja2>=3.1",  # mlflowctl ui (imported only by that command)
    ],
    extras_require={
        "s3": ["boto3>=1.28"],
        # playwright drives Debian's chromium (make browser); it never downloads a browser;
        # tritonclient: the usual V2 client, to test the model server's V2 API and binary tensor extension
        "test": ["pytest>=7", "boto3>=1.28", "moto[server]>=5", "numpy", "playwright>=1.40", "pillow",
                 "tritonclient[http]>=2.40", "kubernetes-validate>=1.30"],
    },
    entry_points={
        "console_scripts": ["mlflowctl = mlflowctl.cli:main"],
    },
)
