# The classic nbdev 2 setup.py: everything it needs is read from settings.ini.
from configparser import ConfigParser
import setuptools, shlex

config = ConfigParser(delimiters=['='])
config.read('settings.ini', encoding='utf-8')
cfg = config['DEFAULT']

expected = 'version description keywords author author_email'.split()
for o in expected: assert o in cfg, f"missing expected setting: {o}"

# SPDX expressions: modern setuptools refuses the old 'License ::' classifiers.
licenses = {'apache2': 'Apache-2.0', 'mit': 'MIT'}
statuses = ['1 - Planning', '2 - Pre-Alpha', '3 - Alpha', '4 - Beta', '5 - Production/Stable', '6 - Mature', '7 - Inactive']
py_versions = '3.10 3.11 3.12 3.13'.split()

requirements = shlex.split(cfg.get('requirements', ''))
dev_requirements = shlex.split(cfg.get('dev_requirements', ''))
# optional extras: pip install scaletrain[hf] (transformers models) / scaletrain[data] (parquet/arrow through datasets)
hf_requirements = shlex.split(cfg.get('hf_requirements', ''))
data_requirements = shlex.split(cfg.get('data_requirements', ''))
gpu_requirements = shlex.split(cfg.get('gpu_requirements', ''))  # scaletrain[gpu]: NVML energy readings
lic = licenses.get(cfg['license'].lower(), cfg['license'])
min_python = cfg['min_python']
console_scripts = cfg.get('console_scripts', '').split()

setuptools.setup(
    name=cfg['lib_name'],
    license=lic,
    classifiers=['Development Status :: ' + statuses[int(cfg['status'])],
                 'Intended Audience :: ' + cfg['audience'].title(),
                 'Natural Language :: ' + cfg['language'].title()]
                + ['Programming Language :: Python :: ' + o for o in py_versions[py_versions.index(min_python):]],
    url=cfg['git_url'],
    packages=setuptools.find_packages(include=[cfg['lib_name'], cfg['lib_name'] + '.*']),
    include_package_data=True,
    install_requires=requirements,
    extras_require={'dev': dev_requirements + hf_requirements + data_requirements,
                    'hf': hf_requirements, 'data': data_requirements, 'gpu': gpu_requirements},
    python_requires='>=' + min_python,
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    zip_safe=False,
    entry_points={'console_scripts': console_scripts, 'nbdev': [f'{cfg.get("lib_path")}={cfg.get("lib_path")}._modidx:d']},
    author=cfg['author'], author_email=cfg['author_email'],
    description=cfg['description'], keywords=cfg['keywords'], version=cfg['version'],
)
