"""What tests and benches share: emulators of Fly, Daily and daily-python (`fakes/`), a whole
dispatcher on loopback (`harness`), the dispatcher and bots as processes (`procs`,
`bot_process`), loopback networking (`net`), waits (`waits`), an OTLP collector and chaos runs."""
