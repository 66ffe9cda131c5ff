"""``torchrun`` for single-node runs, its stores on loopback: ``python -m conrec_verl.runtime.torchrun``.

Same arguments as ``torchrun``. Stock torchrun's rendezvous and agent stores (``pt_elastic``)
listen on every interface, unauthenticated, for the whole SFT stage, whatever
``--rdzv-endpoint``/``--local-addr`` say; here they listen on 127.0.0.1
(:func:`conrec_verl.runtime.loopback.install_loopback_tcpstore`). Use it with the flags of
:func:`conrec_verl.runtime.cpu_env.torchrun_cmd` (``--standalone --local-addr=127.0.0.1``).
"""

from __future__ import annotations


def main() -> None:
    from conrec_verl.runtime.loopback import install_loopback_tcpstore

    install_loopback_tcpstore()
    from torch.distributed.run import main as torchrun_main

    torchrun_main()


if __name__ == "__main__":
    main()
