from setuptools import setup

setup(
    name="netsmtp",
    version="0.1.0",
    description="A small, fast, durable SMTP server: a library and a daemon",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    classifiers=["License :: OSI Approved :: MIT License"],
    packages=["netsmtp"],
    python_requires=">=3.11",
    # 3.20.3 fixes the lock-file symlink races CVE-2025-68146 and CVE-2026-22701.
    install_requires=["filelock>=3.20.3"],
    # flufl.bounce (Apache-2.0): an independent parser of the DSN reports, in tests only.
    extras_require={"test": ["pytest", "hypothesis", "trustme", "flufl.bounce"]},
    entry_points={
        "console_scripts": [
            "netsmtp = netsmtp.cli:main",
            "netsmtp-passwd = netsmtp.cli:passwd",
            "netsmtp-send = netsmtp.queue_cli:send_main",
            "netsmtp-queue = netsmtp.queue_cli:queue_main",
        ],
        # The fixtures smtp_server and make_smtp_server (netsmtp/pytest_plugin.py).
        "pytest11": ["netsmtp = netsmtp.pytest_plugin"],
    },
)
