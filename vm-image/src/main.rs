//! berth-mkinitramfs: writes the guest initramfs from a static `/init` and optional extra files.

use std::fs;
use std::path::PathBuf;

use anyhow::{bail, Context};
use berth_vm_image::{Entry, EntryKind, Initramfs};
use clap::Parser;

/// Build a reproducible initramfs (newc cpio, uncompressed) for the Berth guest.
#[derive(Debug, Parser)]
struct Args {
    /// The program to install as `/init`; must be statically linked.
    #[arg(long)]
    init: PathBuf,
    /// Extra file as `HOST_PATH:ARCHIVE_PATH[:OCTAL_MODE]` (mode defaults to 0755).
    #[arg(long = "file")]
    files: Vec<String>,
    /// Where to write the archive.
    #[arg(long, short)]
    output: PathBuf,
    /// The mtime of every entry; defaults to `SOURCE_DATE_EPOCH`, else 0.
    #[arg(long)]
    mtime: Option<u32>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mtime = match args.mtime {
        Some(mtime) => mtime,
        None => match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(value) => value
                .parse()
                .with_context(|| format!("SOURCE_DATE_EPOCH={value:?} is not a u32"))?,
            Err(_) => 0,
        },
    };

    let mut image = Initramfs::guest_skeleton();
    image.add(file_entry(&args.init, "init", 0o755)?)?;
    for spec in &args.files {
        let mut parts = spec.splitn(3, ':');
        let (Some(source), Some(dest)) = (parts.next(), parts.next()) else {
            bail!("--file {spec:?}: expected HOST_PATH:ARCHIVE_PATH[:OCTAL_MODE]");
        };
        let perm = match parts.next() {
            Some(mode) => u32::from_str_radix(mode, 8)
                .with_context(|| format!("--file {spec:?}: bad octal mode"))?,
            None => 0o755,
        };
        add_parents(&mut image, dest)?;
        image.add(file_entry(
            source.as_ref(),
            dest.trim_start_matches('/'),
            perm,
        )?)?;
    }

    let mut bytes = Vec::new();
    image.write(&mut bytes, mtime)?;
    let tmp = args.output.with_extension("tmp");
    fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &args.output)
        .with_context(|| format!("renaming into {}", args.output.display()))?;
    println!("{}", args.output.display());
    Ok(())
}

fn file_entry(source: &std::path::Path, dest: &str, perm: u32) -> anyhow::Result<Entry> {
    let data = fs::read(source).with_context(|| format!("reading {}", source.display()))?;
    Ok(Entry {
        path: dest.into(),
        perm,
        kind: EntryKind::File(data),
    })
}

/// Adds the missing parent directories of `dest`, skipping those the skeleton already has.
fn add_parents(image: &mut Initramfs, dest: &str) -> anyhow::Result<()> {
    let dest = dest.trim_start_matches('/');
    let mut parent = String::new();
    let components: Vec<&str> = dest.split('/').collect();
    for component in &components[..components.len().saturating_sub(1)] {
        if !parent.is_empty() {
            parent.push('/');
        }
        parent.push_str(component);
        let entry = Entry {
            path: parent.clone(),
            perm: 0o755,
            kind: EntryKind::Directory,
        };
        match image.add(entry) {
            Ok(()) | Err(berth_vm_image::ArchiveError::Duplicate(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
