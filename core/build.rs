//! Recompile when a migration changes: `sqlx::migrate!` embeds the files,
//! and cargo does not otherwise know about them.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
