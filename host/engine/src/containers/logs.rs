//! A container's log on the host: every byte its init wrote, with the stream and the time.
//!
//! dockerd's json-file driver keeps each line as a JSON string, which cannot hold bytes that
//! are not UTF-8; Berth keeps them exactly, so `docker logs` returns what the process wrote.
//! The file is a sequence of records `[stream: u8][time: i64 ns, BE][len: u32 BE][bytes]`,
//! one per line (the newline included), a line longer than [`MAX_RECORD`] split as dockerd
//! splits it. `--tail` counts records, as dockerd counts lines.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// The longest record; longer lines are split (dockerd's limit for a log message).
pub const MAX_RECORD: usize = 16 * 1024;
const HEADER: usize = 1 + 8 + 4;

/// Which output a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogStream {
    /// The process's stdout (and a terminal's output).
    Stdout,
    /// The process's stderr.
    Stderr,
}

impl LogStream {
    fn code(self) -> u8 {
        match self {
            Self::Stdout => 1,
            Self::Stderr => 2,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Stdout),
            2 => Some(Self::Stderr),
            _ => None,
        }
    }
}

/// One line of output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// Where it came from.
    pub stream: LogStream,
    /// When berthd received it, nanoseconds since the Unix epoch.
    pub time_nanos: i64,
    /// The bytes, newline included when the line was complete.
    pub data: Vec<u8>,
}

/// Appends output to a container's log, a line per record.
#[derive(Debug)]
pub struct LogWriter {
    file: BufWriter<File>,
    /// Bytes of an unfinished line, per stream (stdout, stderr), with the time of its first
    /// byte.
    partial: [(Vec<u8>, i64); 2],
}

impl LogWriter {
    /// Opens `path` for appending, creating it.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            file: BufWriter::new(file),
            partial: [(Vec::new(), 0), (Vec::new(), 0)],
        })
    }

    /// Records `data` from `stream`, received at `time_nanos`; complete lines are written,
    /// the rest waits for its newline (or [`LogWriter::flush`]).
    pub fn write(&mut self, stream: LogStream, data: &[u8], time_nanos: i64) -> io::Result<()> {
        let slot = usize::from(stream.code() - 1);
        let mut rest = data;
        while !rest.is_empty() {
            let (buffer, started) = &mut self.partial[slot];
            if buffer.is_empty() {
                *started = time_nanos;
            }
            let room = MAX_RECORD - buffer.len();
            let take = match rest.iter().take(room).position(|&b| b == b'\n') {
                Some(newline) => newline + 1,
                None => rest.len().min(room),
            };
            buffer.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if buffer.ends_with(b"\n") || buffer.len() == MAX_RECORD {
                let time = *started;
                let line = std::mem::take(buffer);
                write_record(&mut self.file, stream, time, &line)?;
            }
        }
        self.file.flush()
    }

    /// Writes unfinished lines as they are (the process ended, or will write no more).
    pub fn flush(&mut self) -> io::Result<()> {
        for (slot, stream) in [LogStream::Stdout, LogStream::Stderr]
            .into_iter()
            .enumerate()
        {
            let (buffer, started) = &mut self.partial[slot];
            if !buffer.is_empty() {
                let time = *started;
                let line = std::mem::take(buffer);
                write_record(&mut self.file, stream, time, &line)?;
            }
        }
        self.file.flush()
    }
}

fn write_record(out: &mut impl Write, stream: LogStream, time: i64, data: &[u8]) -> io::Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| io::Error::other("log record too long"))?;
    let mut header = [0u8; HEADER];
    header[0] = stream.code();
    header[1..9].copy_from_slice(&time.to_be_bytes());
    header[9..13].copy_from_slice(&len.to_be_bytes());
    out.write_all(&header)?;
    out.write_all(data)
}

/// Which records to read.
#[derive(Debug, Clone, Default)]
pub struct LogFilter {
    /// Only records at or after this time (ns since the epoch).
    pub since_nanos: Option<i64>,
    /// Only records before this time.
    pub until_nanos: Option<i64>,
    /// Only the last this many records (after the time filters).
    pub tail: Option<usize>,
    /// Include stdout.
    pub stdout: bool,
    /// Include stderr.
    pub stderr: bool,
}

/// Reads the records of the log at `path` that `filter` selects. A missing log is empty; a
/// record cut short at the end (berthd stopped while writing it) is dropped.
pub fn read_log(path: &Path, filter: &LogFilter) -> io::Result<Vec<LogRecord>> {
    read_log_prefix(path, u64::MAX, filter)
}

/// [`read_log`] over the first `limit` bytes of the file only.
pub fn read_log_prefix(path: &Path, limit: u64, filter: &LogFilter) -> io::Result<Vec<LogRecord>> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(file) => {
            file.take(limit).read_to_end(&mut bytes)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    }
    let mut records = Vec::new();
    let mut rest = bytes.as_slice();
    while rest.len() >= HEADER {
        let time = i64::from_be_bytes(rest[1..9].try_into().expect("8 bytes"));
        let len = u32::from_be_bytes(rest[9..13].try_into().expect("4 bytes")) as usize;
        let Some(data) = rest.get(HEADER..HEADER + len) else {
            break;
        };
        let stream = LogStream::from_code(rest[0]);
        rest = &rest[HEADER + len..];
        let Some(stream) = stream else {
            continue;
        };
        let wanted = match stream {
            LogStream::Stdout => filter.stdout,
            LogStream::Stderr => filter.stderr,
        };
        let in_time = filter.since_nanos.is_none_or(|s| time >= s)
            && filter.until_nanos.is_none_or(|u| time < u);
        if wanted && in_time {
            records.push(LogRecord {
                stream,
                time_nanos: time,
                data: data.to_vec(),
            });
        }
    }
    if let Some(tail) = filter.tail {
        let skip = records.len().saturating_sub(tail);
        records.drain(..skip);
    }
    Ok(records)
}

/// The log file of the container whose directory is `dir`.
pub fn log_path(dir: &Path) -> PathBuf {
    dir.join("container.log")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both() -> LogFilter {
        LogFilter {
            stdout: true,
            stderr: true,
            ..LogFilter::default()
        }
    }

    #[test]
    fn write_split_lines_are_one_record_each() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_path(dir.path());
        let mut log = LogWriter::open(&path).unwrap();

        log.write(LogStream::Stdout, b"hel", 1).unwrap();
        log.write(LogStream::Stdout, b"lo\nworld\n", 2).unwrap();
        log.write(LogStream::Stderr, b"oops\n", 3).unwrap();

        let records = read_log(&path, &both()).unwrap();
        let lines: Vec<_> = records
            .iter()
            .map(|r| (r.stream, r.time_nanos, r.data.as_slice()))
            .collect();
        assert_eq!(
            lines,
            [
                (LogStream::Stdout, 1, b"hello\n".as_slice()),
                (LogStream::Stdout, 2, b"world\n".as_slice()),
                (LogStream::Stderr, 3, b"oops\n".as_slice()),
            ]
        );
    }

    #[test]
    fn write_binary_bytes_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_path(dir.path());
        let mut log = LogWriter::open(&path).unwrap();
        let data: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();

        log.write(LogStream::Stdout, &data, 1).unwrap();
        log.flush().unwrap();

        let back: Vec<u8> = read_log(&path, &both())
            .unwrap()
            .into_iter()
            .flat_map(|r| r.data)
            .collect();
        assert_eq!(back, data);
    }

    #[test]
    fn write_long_line_is_split_at_max_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_path(dir.path());
        let mut log = LogWriter::open(&path).unwrap();

        log.write(LogStream::Stdout, &vec![b'x'; MAX_RECORD + 10], 1)
            .unwrap();
        log.flush().unwrap();

        let sizes: Vec<_> = read_log(&path, &both())
            .unwrap()
            .iter()
            .map(|r| r.data.len())
            .collect();
        assert_eq!(sizes, [MAX_RECORD, 10]);
    }

    #[test]
    fn read_log_tail_and_since_select_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_path(dir.path());
        let mut log = LogWriter::open(&path).unwrap();
        for time in 1..=5 {
            log.write(LogStream::Stdout, format!("{time}\n").as_bytes(), time)
                .unwrap();
        }
        let filter = LogFilter {
            since_nanos: Some(2),
            tail: Some(2),
            ..both()
        };

        let records = read_log(&path, &filter).unwrap();

        let times: Vec<_> = records.iter().map(|r| r.time_nanos).collect();
        assert_eq!(times, [4, 5]);
    }

    #[test]
    fn read_log_truncated_last_record_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_path(dir.path());
        let mut log = LogWriter::open(&path).unwrap();
        log.write(LogStream::Stdout, b"kept\nlost\n", 1).unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 2)
            .unwrap();

        let records = read_log(&path, &both()).unwrap();

        assert_eq!(records.len(), 1);
    }
}
