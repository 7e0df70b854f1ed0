import subprocess
import sys
import threading

from attacks.locks import exclusive


def test_a_second_holder_waits_for_the_first_and_is_told_why(tmp_path, capsys):
    path, order = tmp_path / "model.lock", []

    def second():
        with exclusive(path, waiting="model.pt is being trained"):
            order.append("second")

    with exclusive(path):
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive()  # blocked while the first holds the lock
        order.append("first")
    thread.join(30)
    assert order == ["first", "second"]
    assert "note: waiting for another process: model.pt is being trained" in capsys.readouterr().err


def test_the_lock_of_a_killed_process_is_released(tmp_path):
    path = tmp_path / "scan.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from attacks.locks import exclusive\n"
            "with exclusive(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait(30)
    taken = threading.Event()

    def take():
        with exclusive(path):
            taken.set()

    threading.Thread(target=take, daemon=True).start()
    assert taken.wait(30)
