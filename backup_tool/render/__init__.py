"""Text for people and machines: crontab/systemd/Kubernetes units, the audit report in
Markdown/HTML/SVG, and the terminal console that draws progress."""
