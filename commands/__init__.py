"""The command lines: sample.py and train.py at the repository root, and `python -m commands.NAME`
for the rest. They share one way of parsing and of turning a UserError into one line and exit
code 2 (commands/cli.py). The only layer that imports all others: commands -> pipelines -> ldm."""
