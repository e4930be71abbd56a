//! `kpipe inspect` and `kpipe synth`: describe a NIfTI volume, and write synthetic CT
//! phantom cases.

use std::io::Write;

use super::args::{InspectArgs, SynthArgs};
use super::util::print_json;
use super::{CliError, exit};

/// A volume's header, affine and value range, as text or JSON.
pub(super) fn inspect(args: &InspectArgs, out: &mut impl Write) -> Result<i32, CliError> {
    let file = &args.file;
    let summary = crate::data::nifti::Volume::read(file)?.summary()?;
    if args.json {
        print_json(out, &summary)?;
    } else {
        writeln!(out, "{}", file.display())?;
        writeln!(out, "  shape       {:?}", summary.shape)?;
        writeln!(
            out,
            "  datatype    {} ({}-endian)",
            summary.datatype, summary.endianness
        )?;
        writeln!(out, "  spacing     {:?}", summary.spacing)?;
        writeln!(
            out,
            "  scaling     value * {} + {}",
            summary.scl_slope, summary.scl_inter
        )?;
        writeln!(out, "  range       {} .. {}", summary.min, summary.max)?;
        writeln!(out, "  sum         {}", summary.sum)?;
        writeln!(out, "  NaN count   {}", summary.nan_count)?;
        writeln!(out, "  affine")?;
        for row in summary.affine {
            writeln!(
                out,
                "    [{:>10.4} {:>10.4} {:>10.4} {:>10.4}]",
                row[0], row[1], row[2], row[3]
            )?;
        }
    }
    Ok(exit::OK)
}

/// Writes the phantom cases in the KiTS19 layout.
pub(super) fn synth(args: &SynthArgs, out: &mut impl Write) -> Result<i32, CliError> {
    use crate::data::phantom::{PhantomSpec, kits19_slices, write_dataset_shaped};
    let spec = PhantomSpec {
        cases: args.cases,
        shape: args.shape,
        seed: args.seed,
    };
    let shape_of = |i| match args.kits19_size {
        true => [kits19_slices(args.seed, i), 512, 512],
        false => args.shape,
    };
    let written = write_dataset_shaped(&args.out, &spec, &shape_of, &|_| {})?;
    let tumors = written.iter().filter(|c| c.has_tumor).count();
    writeln!(
        out,
        "wrote {} cases ({tumors} with tumor) to `{}`",
        written.len(),
        args.out.display()
    )?;
    Ok(exit::OK)
}
