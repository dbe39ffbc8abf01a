"""The chaos run (the incident replayed on real workers), its control group, and the harness that
starts, kills and stops real ``qcluster`` processes (``cluster``). See docs/chaos.md."""
