//! The `vmmu` command's argument parser under arbitrary argument vectors.
//!
//! Arguments are drawn from a vocabulary of the command's own words (commands,
//! scenarios, every flag, backing names, sizes with and without suffixes,
//! numbers at the edges) mixed with arbitrary strings, so runs get past clap
//! into the validation code. Properties: no panic, and a refusal is one
//! non-empty line.

use arbitrary::{Arbitrary, Unstructured};

const WORDS: &[&str] = &[
    "run",
    "bench",
    "soak",
    "demand-paging",
    "mmu-stress",
    "memslot-churn",
    "invalidation-storm",
    "roots",
    "-v",
    "-b",
    "-i",
    "-s",
    "-x",
    "-w",
    "-a",
    "-o",
    "--seed",
    "--json",
    "--trace",
    "--no-oracle",
    "--no-precheck",
    "--no-ad",
    "--prefault-host",
    "--vs-kvm",
    "--oracle",
    "--duration",
    "--aliases",
    "--random",
    "--write-percent",
    "-H",
    "-d",
    "-q",
    "-u",
    "-c",
    "-m",
    "MISSING",
    "--help",
    "--version",
    "anonymous",
    "anonymous_thp",
    "hugetlb2m",
    "hugetlb1g",
    "shared_hugetlb",
    "anonymous_hugetlb",
    "anonymous_hugetlb_2mb",
    "anonymous_hugetlb_1gb",
    "shmem",
    "0",
    "1",
    "2",
    "64",
    "65",
    "100",
    "101",
    "4096",
    "4097",
    "2M",
    "1G",
    "512M",
    "64T",
    "16E",
    "1000",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "-1",
    "",
    " ",
    "1.5G",
    "K",
];

/// One argument: a word of the command's vocabulary or anything.
#[derive(Arbitrary, Debug)]
pub enum Arg {
    /// A known word.
    Word(u8),
    /// Anything.
    Raw(String),
}

/// Check one argument vector (without the program name).
pub fn run(args: &[Arg]) -> Result<(), String> {
    let argv: Vec<String> = std::iter::once("vmmu".to_string())
        .chain(args.iter().take(24).map(|a| match a {
            Arg::Word(i) => WORDS[*i as usize % WORDS.len()].to_string(),
            Arg::Raw(s) => s.clone(),
        }))
        .collect();
    match vmmu_cli::check_args(argv.clone()) {
        Ok(()) => Ok(()),
        Err(line) if line.trim().is_empty() => Err(format!("{argv:?}: empty error line")),
        Err(line) if line.contains('\n') => Err(format!("{argv:?}: more than one line: {line}")),
        Err(_) => Ok(()),
    }
}

/// Decode `data` as an argument vector and check it.
pub fn run_bytes(data: &[u8]) -> Result<(), String> {
    let mut u = Unstructured::new(data);
    match Vec::<Arg>::arbitrary(&mut u) {
        Ok(args) => run(&args),
        Err(_) => Ok(()),
    }
}
