//! A short run of the command fuzzing that `benches/fuzz_commands.rs` runs a million inputs of:
//! the same generators (arbitrary bytes, JSON of any shape, requests with random fields, byte
//! flips) through the command parser, id sniffing and canonical form. A panic fails it.

#[path = "../benches/fuzz_commands.rs"]
mod fuzz;

#[test]
fn three_thousand_generated_command_inputs_never_panic() {
    let decoded = fuzz::fuzz(3_000);
    println!(
        "fuzz_commands: 3000 inputs, {:.1}% decode as requests",
        decoded * 100.0
    );
    // The generators reach the deep checks: some inputs are requests, most are not.
    assert!(decoded > 0.01 && decoded < 0.99, "{decoded}");
}
