"""The bot runtime: runs a team's own Pipecat bot file once per session (`python -m bot_runtime`).

It reads the bot contract the dispatcher gives each machine, imports the bot named by
BOT_ENTRYPOINT, calls its `bot(runner_args)` with Pipecat's own runner arguments, and does
what the contract asks around that call: ready, ended, signals, the time limit, the warm
pool's assignment, logs and traces.
"""
