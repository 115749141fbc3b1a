"""`dinoscale demo`: the whole pipeline on the embedded synthetic pool (`dinoscale.demo.run`), and its
config section (`dinoscale.demo.config`)."""
