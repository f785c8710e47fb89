//! A real Modbus device for the tests: pymodbus's server (tests/modbus/server.py) as a child
//! process, over TCP on a free loopback port or over RTU on one end of a pty pair.
//!
//! pymodbus comes from PyPI into a venv under the build directory, made once by
//! tests/modbus/venv.sh (which `scripts/test` also runs before the tests, so a machine without
//! network fails there, not in the middle of a test). The server prints one line per request
//! it serves (`request unit=U fc=F address=A count=C`), so a test can count requests on the
//! device's side.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{POLL, kill_and_reap, read_log, send_signal};

/// How long the server may take to import pymodbus and listen (a cold import is ~1 s).
const START_TIMEOUT: Duration = Duration::from_secs(30);

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The venv's python, made on first use.
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let venv = repo("target/test-venv-modbus");
        let out = Command::new(repo("tests/modbus/venv.sh"))
            .arg(&venv)
            .stdin(Stdio::null())
            .output()
            .expect("run tests/modbus/venv.sh");
        assert!(
            out.status.success(),
            "cannot make the pymodbus venv (python3-venv installed? PyPI reachable?):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// Where the device listens.
#[derive(Debug, Clone)]
pub enum Transport {
    Tcp(u16),
    /// A serial device path, with pyserial's parity letter (`N`, `E`, `O`) and baud.
    Rtu {
        path: PathBuf,
        baud: u32,
        parity: char,
    },
}

pub struct ModbusDevice {
    transport: Transport,
    map: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
    child: Option<Child>,
}

impl ModbusDevice {
    /// Starts the device with the register map `map_json` (see tests/modbus/server.py).
    pub fn start(dir: &Path, name: &str, transport: Transport, map_json: &str) -> ModbusDevice {
        let map = dir.join(format!("{name}.map.json"));
        std::fs::write(&map, map_json).expect("write the register map");
        let mut device = ModbusDevice {
            transport,
            map,
            stdout: dir.join(format!("{name}.requests.log")),
            stderr: dir.join(format!("{name}.stderr.log")),
            child: None,
        };
        device.start_again();
        device
    }

    /// Starts the server again (after [`ModbusDevice::kill`]), on the same port or device.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "start_again() while running");
        let open = |p: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .expect("open a device log")
        };
        let mut cmd = Command::new(python());
        cmd.arg(repo("tests/modbus/server.py"))
            .arg("--map")
            .arg(&self.map);
        match &self.transport {
            Transport::Tcp(port) => {
                cmd.arg("--tcp").arg(port.to_string());
            }
            Transport::Rtu { path, baud, parity } => {
                cmd.arg("--rtu")
                    .arg(path)
                    .arg("--baud")
                    .arg(baud.to_string())
                    .arg("--parity")
                    .arg(parity.to_string());
            }
        }
        let already = self.listening_count();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(open(&self.stdout))
            .stderr(open(&self.stderr))
            .spawn()
            .expect("start the pymodbus server");
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while self.listening_count() == already {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok())
                .flatten();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "the Modbus device did not start ({exited:?}):\n{}",
                read_log(&self.stderr)
            );
            std::thread::sleep(POLL);
        }
    }

    fn listening_count(&self) -> usize {
        read_log(&self.stdout)
            .lines()
            .filter(|l| *l == "listening")
            .count()
    }

    /// Every request served so far, as `(unit, function code, address)`, in order.
    pub fn requests(&self) -> Vec<(u8, u8, u16)> {
        read_log(&self.stdout)
            .lines()
            .filter_map(|l| {
                let mut it = l.strip_prefix("request ")?.split(' ').map(|kv| {
                    kv.split_once('=')
                        .and_then(|(_, v)| v.parse::<u32>().ok())
                        .unwrap_or(u32::MAX)
                });
                let (u, f, a) = (it.next()?, it.next()?, it.next()?);
                Some((u as u8, f as u8, a as u16))
            })
            .collect()
    }

    /// SIGSTOP: the device keeps its sockets but answers nothing.
    pub fn freeze(&mut self) {
        let pid = self.child.as_ref().expect("running").id();
        assert!(send_signal(pid, "STOP"), "SIGSTOP the device");
    }

    /// SIGCONT after [`ModbusDevice::freeze`].
    pub fn thaw(&mut self) {
        let pid = self.child.as_ref().expect("running").id();
        assert!(send_signal(pid, "CONT"), "SIGCONT the device");
    }

    /// SIGKILL: the port closes (connections refused) until [`ModbusDevice::start_again`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }

    /// The server's own log (pymodbus warnings and tracebacks), for failure messages.
    pub fn stderr(&self) -> String {
        read_log(&self.stderr)
    }
}

impl Drop for ModbusDevice {
    fn drop(&mut self) {
        self.kill();
    }
}
