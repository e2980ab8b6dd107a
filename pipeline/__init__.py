"""The one-command pipeline (`python -m pipeline demo`) and the fixtures it shares with the tests and the
benchmarks (the server launcher, the built bases' folders).

It imports none of finetune, serve and client: it runs their command lines and reads what they write.
"""
