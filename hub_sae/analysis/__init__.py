"""DLM-Scope's analyses as library functions, each also a `hub-sae analyze` command.

    dynamics.py   decoding-order dynamics of SAE features on a Timeline (`analyze order`)
    steering.py   DLM-Scope steering sweeps: concept and fluency by steering value (`analyze steer`)
    matching.py   one-to-one matching of two SAEs' features by decoder cosine (`analyze compare`)
    insertion.py  SAE insertion loss by layer and masking ratio, DLM beside AR (`analyze insertion`)
    report.py     what every command shares: suites, prompts, decodes, and its output (JSON + PNG +
                  markdown table); hub_sae.cli defines the commands' arguments

The definitions are DESIGN.md's "Analyses"; README's "Analyses" section shows each on the default.
"""
